"""Starting weights from a foundation: what ``promptsam pretrain`` writes, or one packaged with the code.

``model.foundation`` names a foundation folder (``sam_<preset>.pth``, ``clip/``, ``text_to_sparse.pt``,
``provenance.json``, see :mod:`shared_model.pretrain.export`): either a packaged name (``"tiny"`` is
``shared_model/assets/foundation/tiny``, pre-trained on public data no hospital of the federation owns)
or a path (absolute, relative to the working directory, or relative to the project root). The model is
then built as from real weights: the SAM ``.pth`` and the open_clip folder go through the same loaders
as ``model.sam.checkpoint`` / ``model.clip.checkpoint``, and the pretraining's text -> SAM-token
projection initialises ``prompts.sparse``.

A model records the foundation's digest (SHA-256 over its weight files), so a checkpoint trained on
one foundation is never silently loaded onto another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from shared_model.config import ConfigError, ModelConfig
from shared_model.config.experiment import PROJECT_ROOT

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "foundation"
CLIP_FOLDER = "clip"
TEXT_TO_SPARSE = "text_to_sparse.pt"


@dataclass(frozen=True)
class FoundationFiles:
    """The files of one foundation folder."""

    folder: Path
    sam: Path
    clip: Path
    text_to_sparse: Path | None

    def digest(self) -> str:
        """SHA-256 (hex) over the weight files' bytes, in a fixed order: the foundation's identity."""
        files = [self.sam] + sorted(p for p in self.clip.iterdir() if p.is_file())
        if self.text_to_sparse is not None:
            files.append(self.text_to_sparse)
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.relative_to(self.folder).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
        return digest.hexdigest()


def _asset_roots() -> list[Path]:
    """Where packaged foundations may lie: beside this module, then in the installed ``promptsam``.

    The second place matters when this module runs from a copy without the weight files: a Flower
    app bundle (FAB) carries only source and text files, not ``.pth`` / ``.bin``.
    """
    roots = [ASSETS]
    try:
        dist = importlib.metadata.distribution("promptsam")
        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://"):  # an editable install: the project folder
            roots.append(Path(url[len("file://"):]) / "shared_model" / "assets" / "foundation")
        roots.append(Path(str(dist.locate_file("shared_model/assets/foundation"))))
    except (importlib.metadata.PackageNotFoundError, ValueError, OSError):
        pass
    return roots


def packaged_foundations() -> list[str]:
    """Names of the foundations shipped with the code (folders under ``shared_model/assets/foundation``)."""
    return sorted({p.name for root in _asset_roots() if root.is_dir() for p in root.iterdir() if p.is_dir()})


def foundation_folder(spec: str) -> Path:
    """A packaged name or a folder path -> the foundation folder.

    Raises:
        ConfigError: Naming ``model.foundation`` when no such name or folder exists.
    """
    if spec and "/" not in spec:
        for root in _asset_roots():
            if any((root / spec).glob("sam_*.pth")):
                return root / spec
    path = Path(spec).expanduser()
    for candidate in ((path,) if path.is_absolute() else (Path.cwd() / path, PROJECT_ROOT / path)):
        if candidate.is_dir():
            return candidate.resolve()
    raise ConfigError(f"model.foundation: {spec!r} is neither a packaged foundation "
                      f"({packaged_foundations()}) nor a folder")


def foundation_files(spec: str, preset: str) -> FoundationFiles:
    """The weight files of foundation ``spec`` for ``preset``.

    Raises:
        ConfigError: Naming the folder and the missing file.
    """
    folder = foundation_folder(spec)
    sam = folder / f"sam_{preset}.pth"
    if not sam.is_file():
        found = sorted(p.name for p in folder.glob("sam_*.pth"))
        raise ConfigError(f"model.foundation: {folder} has no {sam.name} for preset {preset!r}"
                          + (f" (it has {found})" if found else ""))
    clip = folder / CLIP_FOLDER
    if not (clip / "open_clip_config.json").is_file():
        raise ConfigError(f"model.foundation: {clip} is not an open_clip folder (no open_clip_config.json)")
    extra = folder / TEXT_TO_SPARSE
    return FoundationFiles(folder, sam, clip, extra if extra.is_file() else None)


def with_foundation_weights(cfg: ModelConfig) -> tuple[ModelConfig, FoundationFiles | None]:
    """``cfg`` with ``sam.checkpoint`` and ``clip.checkpoint`` pointing into its foundation (a copy).

    Returns:
        (the config to build from, the foundation's files or None when ``cfg.foundation`` is unset).

    Raises:
        ConfigError: When a foundation and explicit checkpoints are both set, or the foundation is missing.
    """
    if not cfg.foundation:
        return cfg, None
    for field, value in (("sam.checkpoint", cfg.sam.checkpoint), ("clip.checkpoint", cfg.clip.checkpoint)):
        if value:
            raise ConfigError(f"model.{field}: set together with model.foundation ({cfg.foundation!r}); "
                              "a foundation provides both weights, keep one of the two")
    files = foundation_files(cfg.foundation, cfg.preset)
    resolved = dataclasses.replace(
        cfg,
        sam=dataclasses.replace(cfg.sam, checkpoint=str(files.sam)),
        clip=dataclasses.replace(cfg.clip, checkpoint=str(files.clip)),
    )
    return resolved, files


def load_text_to_sparse(module: torch.nn.Module | None, files: FoundationFiles) -> bool:
    """Initialise ``prompts.sparse`` from the pretraining's projection when the shapes agree.

    Returns:
        Whether it was loaded (False when the model has no sparse text tokens, the foundation has
        no projection, or ``prompts.text_tokens`` differs from the pretraining's token count).
    """
    if module is None or files.text_to_sparse is None:
        return False
    state = torch.load(files.text_to_sparse, map_location="cpu", weights_only=True)
    own = module.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        return False
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return True
