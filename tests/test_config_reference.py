"""docs/configuration.md lists every setting of every settings class, as the generator writes it.

When a test here fails after you added or changed a setting, regenerate the file:
    .venv/bin/python scripts/gen_config_reference.py
"""

from __future__ import annotations

import subprocess
import sys

from tests.environment import clean_environ
from tests.test_exported_settings import ROOT, reference_module

DOC = ROOT / "docs" / "configuration.md"


def test_every_setting_is_in_the_reference() -> None:
    reference = reference_module()
    text = DOC.read_text()
    settings = [s for cls in reference.settings_classes() for s in reference.variables(cls)]
    missing = [s.variable for s in settings if f"| `{s.variable}` |" not in text]
    assert not missing, (
        f"missing from docs/configuration.md: {', '.join(missing)}; run: {reference.COMMAND}"
    )
    # The ones a new user met nowhere before this reference existed.
    assert {
        "STREAMMESH_STREAM_PREFIX",
        "STREAMMESH_AUTH_REDIS_PREFIX",
        "STREAMMESH_DB_SCHEMA_PREFIX",
        "STREAMMESH_HOST",
        "STREAMMESH_STATE_DIR",
        "STREAMMESH_PROCESSOR_LEASE_TTL_MS",
    } <= {s.variable for s in settings}


def test_every_setting_has_a_description() -> None:
    reference = reference_module()
    bare = [
        s.variable
        for cls in reference.settings_classes()
        for s in reference.variables(cls)
        if not s.description
    ]
    assert not bare, f"add Field(..., description=...) to: {', '.join(bare)}"


def test_the_reference_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_config_reference.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_environ(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
