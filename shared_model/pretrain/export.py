"""The foundation's files, in the formats of the real weights, and their provenance.

``OUT/sam_<preset>.pth``: segment-anything's state dict (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``), as ``sam_model_registry`` models have it, for ``model.sam.checkpoint``;
``OUT/clip/``: an open_clip folder for ``model.clip.checkpoint``; ``OUT/provenance.json``: what
made them; ``OUT/text_to_sparse.pt``: the pretraining's own text -> SAM-token projection (float32,
the layout of PromptSAM's ``prompts.sparse``; nothing loads it yet). Weights may be stored in
float16 (loading copies them into float32 parameters).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from shared_model.modeling.biomedclip import write_clip_folder
from shared_model.pretrain.model import Foundation

CLIP_FOLDER = "clip"
PROVENANCE = "provenance.json"
TEXT_TO_SPARSE = "text_to_sparse.pt"  # the pretraining's text -> SAM-token projection (not loaded by anything yet)


def sam_file_name(preset: str) -> str:
    return f"sam_{preset}.pth"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_foundation(model: Foundation, out: str | Path, half: bool) -> dict[str, str]:
    """Write the SAM ``.pth`` and the open_clip folder of ``model`` into ``out``.

    Returns:
        ``{relative file path: sha256}`` of every file written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else None
    sam_path = out / sam_file_name(model.cfg.preset)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.sam.state_dict().items()}
    tmp = sam_path.with_name(f"{sam_path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    tmp.replace(sam_path)
    folder = write_clip_folder(out / CLIP_FOLDER, model.clip, model.clip_cfg, dtype)
    extra = out / TEXT_TO_SPARSE  # no real checkpoint has it; PromptSAM's prompts.sparse has its layout
    torch.save({k: v.detach().cpu().clone() for k, v in model.text_to_sparse.state_dict().items()}, extra)
    files = [sam_path] + sorted(p for p in folder.iterdir() if p.is_file()) + [extra]
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in files}


def write_provenance(out: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``OUT/provenance.json`` (sorted keys, indented)."""
    path = Path(out) / PROVENANCE
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_provenance(folder: str | Path) -> dict[str, Any]:
    """``folder/provenance.json`` as a dict (FileNotFoundError naming the file when absent)."""
    path = Path(folder) / PROVENANCE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no provenance file")
    return json.loads(path.read_text())
