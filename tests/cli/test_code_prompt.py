"""The CLI's code prompt under `--password-stdin`: the code is the next stdin line, or a clear exit."""

from __future__ import annotations

import argparse
import io

import pytest

from streammesh.cli.accounts import _read_code, read_password


def _stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


def test_the_code_is_the_line_after_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    _stdin(monkeypatch, "Tidy-lamp-47-orbit-canyon\n123 456\n")
    args = argparse.Namespace(password_stdin=True)
    assert read_password(args) == "Tidy-lamp-47-orbit-canyon"
    assert _read_code("code: ", "--code CODE") == "123456"


def test_an_ended_stdin_exits_with_what_to_pass_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    # `echo "$PW" | streammesh login root --password-stdin` ended in an EOFError traceback.
    _stdin(monkeypatch, "Tidy-lamp-47-orbit-canyon\n")
    assert read_password(argparse.Namespace(password_stdin=True)) == "Tidy-lamp-47-orbit-canyon"
    with pytest.raises(SystemExit) as exit_info:
        _read_code("code: ", "--code CODE or --recovery-code CODE")
    assert str(exit_info.value.code).strip() == (
        "no code to read: stdin ended; pass --code CODE or --recovery-code CODE"
    )
