"""Run a promptsam command (or a script) with the tiny text tower's pooler set to open_clip's mean_pooler.

Usage: python mean_pooler.py -m cli.main ARGS...   |   python mean_pooler.py SCRIPT ARGS...
"""
import json
import runpy
import sys

import shared_model.modeling.biomedclip as bc

_original = bc._write_folder


def _write_folder(files):
    name = bc.CONFIG_NAME
    if name in files:
        cfg = json.loads(files[name])
        text = cfg.get("model_cfg", {}).get("text_cfg", {})
        if text.get("hf_pooler_type") == "cls_last_hidden_state_pooler":
            text["hf_pooler_type"] = "mean_pooler"
            files = {**files, name: json.dumps(cfg, indent=2) + "\n"}
    return _original(files)


bc._write_folder = _write_folder
if sys.argv[1] == "-m":
    sys.argv = [sys.argv[2]] + sys.argv[3:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
