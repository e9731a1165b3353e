"""Third-party code must not give the root logger a handler: Flower's log lines would print twice.

The subprocess cases run in a fresh interpreter: this process imported Opacus long ago.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

from shared_model.logging_guard import no_new_root_handlers

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_the_guard_removes_only_the_handlers_added_inside_it():
    root = logging.getLogger()
    kept, added = logging.NullHandler(), logging.NullHandler()
    root.addHandler(kept)
    try:
        with no_new_root_handlers():
            root.addHandler(added)
        assert kept in root.handlers and added not in root.handlers
    finally:
        root.removeHandler(kept)


def test_the_causes_a_plain_opacus_import_and_a_module_level_logging_call():
    # If these stop adding a handler, the guards have nothing left to undo.
    out = _run("import logging, opacus; print('after opacus', len(logging.getLogger().handlers))\n"
               "logging.getLogger().handlers.clear()\n"
               "import open_clip.factory; open_clip.factory.logging.info('x')\n"
               "print('after open_clip', len(logging.getLogger().handlers))")
    assert "after opacus 1" in out and "after open_clip 1" in out


def test_after_the_privacy_imports_and_a_model_build_a_flower_log_line_is_printed_once():
    out = _run("import logging\nimport shared_model.training.privacy, shared_model.training.accounting\n"
               "from shared_model.config import get_preset\nfrom shared_model.modeling.prompt_sam import build_model\n"
               "build_model(get_preset('tiny'))\n"
               "from flwr.common.logger import log\n"
               "log(logging.INFO, 'promptsam-marker')\n"
               "print('root handlers', len(logging.getLogger().handlers))")
    assert "root handlers 0" in out
    assert out.count("promptsam-marker") == 1, out
