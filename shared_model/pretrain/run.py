"""``promptsam pretrain``: train every weight of a preset on public data, resumably, and export it.

Determinism: the weights are initialised from ``pretrain.seed``; step ``s`` draws its batch and
prompts from ``default_rng([seed, s])`` (:class:`~shared_model.pretrain.data.PretrainData`) and
seeds torch (dropout) from the same pair; the learning rate is a function of ``s``. The resumable
state (``OUT/state.pt``: step, weights, AdamW state, fingerprint) is therefore all a run needs to
continue exactly as if it had not stopped.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from tqdm.auto import tqdm

from shared_model.config import ConfigError, to_dict
from shared_model.config.experiment import source_commit
from shared_model.config.pretrain import PretrainConfig, pretrain_fingerprint
from shared_model.pretrain.data import PretrainData
from shared_model.pretrain.export import export_foundation, write_provenance
from shared_model.pretrain.model import Foundation
from shared_model.training.loop import autocast_for, resolve_device, warmup_cosine

log = logging.getLogger(__name__)
STATE = "state.pt"
FORMAT = "promptsam-foundation/1"


def _optimizer(model: Foundation, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, embeddings' scales, logit_scale)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.default_rng([seed, step, 1]).integers(2**62))


def _save_state(path: Path, step: int, model: Foundation, optimizer: torch.optim.Optimizer, fingerprint: str,
                seconds: float, started: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"step": step, "fingerprint": fingerprint, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "seconds": seconds, "started_utc": started}, tmp)
    tmp.replace(path)


def _load_state(path: Path, model: Foundation, optimizer: torch.optim.Optimizer, fingerprint: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no pretraining state to resume (run without --resume)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(f"{path}: the state was written by another config (fingerprint "
                          f"{str(state.get('fingerprint'))[:16]}..., this config {fingerprint[:16]}...); "
                          "resume with the same config and --steps, or use another --out")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool = False, device: str = "auto",
             command: list[str] | None = None, until: int | None = None) -> dict[str, Any]:
    """Pretrain, save the resumable state, export the foundation and its provenance.

    Args:
        cfg: The pretraining config.
        out: Output folder (``sam_<preset>.pth``, ``clip/``, ``provenance.json``, ``state.pt``).
        resume: Continue from ``out/state.pt`` (same config fingerprint required).
        device: ``auto``, ``cpu``, ``cuda``...
        command: The command line, for the provenance.
        until: Stop after this many steps in all (state saved, nothing exported): an interruption.

    Returns:
        The provenance record (also written to ``out/provenance.json`` unless stopped by ``until``).

    Raises:
        ConfigError: A forbidden data root, a state of another config, or a state present without ``resume``.
    """
    out = Path(out)
    t = cfg.pretrain
    fingerprint = pretrain_fingerprint(cfg)
    device = resolve_device(device)
    data = PretrainData(cfg)
    state_path = out / STATE
    if state_path.exists() and not resume:
        raise ConfigError(f"{state_path}: a pretraining state exists; pass --resume to continue it, or use "
                          "another --out")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        model = Foundation(cfg.model)
    model.to(device).train()
    optimizer = _optimizer(model, t.lr, t.weight_decay)
    start, spent, started = 0, 0.0, _utc_now()
    if resume:
        state = _load_state(state_path, model, optimizer, fingerprint)
        start, spent, started = int(state["step"]), float(state["seconds"]), str(state["started_utc"])
    out.mkdir(parents=True, exist_ok=True)
    log.info("pretrain %s: %s items per source; steps %d..%d; fingerprint %s", cfg.model.preset, data.counts(),
             start, t.steps, fingerprint[:16])
    params = list(model.parameters())
    began, window, last = time.perf_counter(), [], {}
    stop = min(t.steps, until) if until is not None else t.steps
    done = start
    # The steps seed torch's generators (dropout) themselves; the caller's generators are left as they were.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        bar = tqdm(range(start, stop), desc="pretrain", disable=not t.progress, initial=start, total=stop)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = t.lr * warmup_cosine(step, t.warmup_steps, t.steps)
            batch = data.batch(step)
            batch.images = batch.images.to(device)
            torch.manual_seed(_step_seed(t.seed, step))
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(device, t.amp):
                loss, parts = model.losses(batch, t)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite pretraining loss at step {step}: {parts}")
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            model.clamp_logit_scale()
            window.append(parts)
            bar.set_postfix(loss=f"{parts['total']:.3f}")
            done = step + 1
            elapsed = spent + time.perf_counter() - began
            if done % t.log_every == 0 or done == stop:
                last, window = _means(window), []
                log.info("step %d/%d  %s  %.2f s/step", done, t.steps,
                         "  ".join(f"{k} {last[k]:.4f}" for k in ("total", "dice", "bce", "iou", "clip") if k in last),
                         (time.perf_counter() - began) / (done - start))
            if done % t.save_every == 0 and done < stop:
                _save_state(state_path, done, model, optimizer, fingerprint, elapsed, started)
            if t.time_limit_s > 0 and elapsed > t.time_limit_s:
                log.info("pretrain: time limit %.0f s reached after %d steps", t.time_limit_s, done)
                break
        bar.close()
    if window:
        last = _means(window)
    seconds = spent + time.perf_counter() - began
    _save_state(state_path, done, model, optimizer, fingerprint, seconds, started)
    if until is not None and done < t.steps:
        return {"steps": done, "complete": False}
    files = export_foundation(model, out, t.half_precision)
    record = {
        "format": FORMAT,
        "preset": cfg.model.preset,
        "fingerprint": fingerprint,
        "steps": done,
        "steps_planned": t.steps,
        "complete": done >= t.steps,
        "seed": t.seed,
        "seconds": round(seconds, 1),
        "started_utc": started,
        "finished_utc": _utc_now(),
        "data": {"sources": [{"root": s.root, "centres": s.centres, "task": s.task} for s in cfg.data.sources],
                 "train_items": data.counts(), "scenes": to_dict(cfg.scenes),
                 "forbidden_roots": cfg.forbidden_roots},
        "last_losses": {k: round(v, 4) for k, v in last.items()},
        "half_precision": t.half_precision,
        "files": files,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": _device_name(device)},
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "command": command or [],
        "code_commit": source_commit(),
        "config": to_dict(cfg),
    }
    write_provenance(out, record)
    return record


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _means(window: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for p in window for k in p})
    return {k: float(np.mean([p[k] for p in window if k in p])) for k in keys}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
