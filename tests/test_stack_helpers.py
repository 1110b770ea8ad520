"""Small process and port helpers the CLI, the bench and the tests share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from streammesh.cli.stack import StackConfig, free_ports, prepare_state, process_alive


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports("127.0.0.1", 20)
    assert len(set(ports)) == 20
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_process_alive_tells_running_from_exited_and_zombie() -> None:
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    assert not process_alive(child.pid)  # a zombie is not alive
    child.wait()
    assert not process_alive(child.pid)


def test_every_storage_replica_gets_the_one_page_token_secret(tmp_path: Path) -> None:
    """A page token one storage replica issued must verify on the next one round_robin sends
    the next page to: the stack makes one secret (mode 0600) and gives its path to each."""
    config = StackConfig(state_dir=tmp_path / "state")
    assert "secrets/storage-page-token-secret" in prepare_state(config)
    secret = config.page_token_secret_file
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.read_bytes().strip()
    env = config.service_env("storage")
    assert env["STREAMMESH_STORAGE_PAGE_TOKEN_SECRET_FILE"] == str(secret)
    assert prepare_state(config) == []  # kept: a restart does not void tokens in flight
    assert "STREAMMESH_INGEST_PAGE_TOKEN_SECRET_FILE" not in config.service_env("ingest")
