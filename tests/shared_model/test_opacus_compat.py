"""Opacus' import-time ``logging.basicConfig`` must not make every Flower log line print twice.

Each case runs in a fresh interpreter: this process has imported Opacus long ago.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_a_plain_opacus_import_adds_a_root_handler():
    # The cause; if Opacus stops doing this, shared_model.opacus_compat has nothing left to undo.
    out = _run("import logging, opacus; print('root handlers', len(logging.getLogger().handlers))")
    assert "root handlers 1" in out


def test_after_the_project_imports_a_flower_log_line_is_printed_once():
    out = _run("import logging\nimport shared_model.privacy, shared_model.dp_accounting\n"
               "from flwr.common.logger import log\n"
               "log(logging.INFO, 'promptsam-marker')\n"
               "print('root handlers', len(logging.getLogger().handlers))")
    assert "root handlers 0" in out
    assert out.count("promptsam-marker") == 1, out
