"""The training jobs of a comparison (:mod:`simulation.comparison`): one site's model, a federated
run through the real ServerApp and ClientApp, personalised FedAvg, and how each is scored (per test
image, next to its own constant-mask baseline)."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from shared_model.config import ConfigError, model_config_from_dict
from shared_model.config.experiment import Experiment, apply_overrides, parse_experiment

if TYPE_CHECKING:
    from simulation.comparison import CompareConfig

log = logging.getLogger(__name__)


def comparison_dataset(exp: Experiment, centres: list[str], split: str, seed: int = 0,
                       augment: bool | None = None, extras: bool = True):
    """The ``split`` ("train" or "test") of ``centres``, pooled (the run's seeded per-centre split).

    The training split is augmented if the data config says so (or ``augment``), prompted per
    ``data.prompt_mode``, with the rehearsal scenes and negative prompts of the data config (if
    ``extras``; :func:`~shared_model.data.negatives.site_training_set`); the test split is a
    scored set, prompted per ``data.eval_prompt``
    (:func:`~shared_model.data.dataset.evaluation_dataset`: the class name by default).
    """
    from shared_model.data.dataset import PolypDataset, evaluation_dataset
    from shared_model.data.partition import hospital_splits

    data = replace(exp.data, centres=list(centres))
    samples = [s for site in hospital_splits(data, exp.partition, len(centres)) for s in getattr(site, split)]
    sam = model_config_from_dict(exp.model).sam
    if split != "train":
        return evaluation_dataset(samples, sam.image_size, data.eval_prompt, data.class_name, data.on_error,
                                  resize=sam.input_resize)
    from shared_model.data.negatives import site_training_set

    train = PolypDataset(samples, sam.image_size, augment=data.augment if augment is None else augment, seed=seed,
                         prompt_mode=data.prompt_mode, class_name=data.class_name, on_error=data.on_error,
                         resize=sam.input_resize)
    return site_training_set(train, data, sam.image_size) if extras else train


def train_single_site(exp: Experiment, centres: list[str], steps: int, seed: int, out: Path) -> dict[str, Any]:
    """Centralized or local training: ``steps`` AdamW steps on the pooled train split of ``centres``."""
    from shared_model.checkpoint import save_model_checkpoint
    from shared_model.data.scene_dataset import own_examples
    from shared_model.modeling.prompt_sam import build_model
    from shared_model.training.loop import train_model

    train = comparison_dataset(exp, centres, "train", seed)
    model = build_model(model_config_from_dict(exp.model))
    cfg = replace(exp.train, steps=steps, seed=seed, progress=False, proximal_mu=0.0)
    result = train_model(model, train, cfg, device=exp.federation.device)
    save_model_checkpoint(out / "model.pt", model, extra={"steps": result.steps, "centres": centres})
    return {"checkpoint": str(out / "model.pt"), "steps": result.steps, "seconds": result.seconds,
            "train_images": own_examples(train), "train_items": len(train)}


def train_federated(raw: Mapping[str, Any], method: str, centres: list[str], cfg: CompareConfig,
                    seed: int, out: Path, total_steps: int | None = None) -> dict[str, Any]:
    """FedAvg / FedProx through the real ServerApp and ClientApp, one hospital per centre, with
    ``total_steps`` (default ``compare.total_steps``) local steps summed over rounds and hospitals."""
    from client.app import app as client_app
    from server.loop import FederatedServer
    from shared_model.config import from_run_config
    from simulation.inprocess import InProcessGrid

    hospitals = len(centres)
    local_steps = (cfg.total_steps if total_steps is None else total_steps) // (cfg.rounds * hospitals)
    exp = parse_experiment(apply_overrides(dict(raw), {
        "data.centres": list(centres), "simulation.num_supernodes": hospitals,
        "federation.strategy": method, "federation.proximal_mu": cfg.proximal_mu,
        "federation.num_server_rounds": cfg.rounds, "federation.local_steps": local_steps,
        "federation.seed": seed, "train.seed": seed, "federation.resume": False,
    }), f"{method} on {centres}")
    exp.federation.run_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    run_config = exp.run_config()
    start = time.perf_counter()
    seconds = finished_run_seconds(out, run_config)
    if seconds is None:
        FederatedServer(from_run_config(run_config), run_config).run(InProcessGrid(client_app, run_config, hospitals))
        seconds = time.perf_counter() - start
    else:
        log.info("%s: the same federated run finished here before; reusing it", out)
    summary = json.loads((out / "summary.json").read_text())
    return {"checkpoint": str(out / "final_model.pt"), "steps": local_steps * cfg.rounds * hospitals,
            "seconds": seconds, "local_steps": local_steps, "global_val_dice_by_round": summary["global"]["dice"]}


def finished_run_seconds(out: Path, run_config: Mapping[str, Any]) -> float | None:
    """If ``out`` holds a federated run that finished every round with ``run_config`` (compared as
    parsed settings, so fields added since take their defaults; the run folder and resume flag
    aside), its training time in seconds (the sum of its rounds); else None.

    A personalised job (``fedavg_ft``) then fine-tunes that run's final model again instead of
    training it again, e.g. when only ``compare.finetune_lr`` changed.
    """
    from server.loop import RUN_CONFIG_NAME
    from shared_model.config import from_run_config

    def settings(cfg: Mapping[str, Any]):
        parsed = from_run_config(dict(cfg))
        parsed.federation.run_dir, parsed.federation.resume = "", False
        return parsed

    try:
        done = settings(json.loads((out / RUN_CONFIG_NAME).read_text()))
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError, ConfigError):
        return None
    rounds = run_config["num-server-rounds"]
    if done != settings(run_config) or not (out / "final_model.pt").is_file():
        return None
    if summary.get("global", {}).get("dice", {}).get(str(rounds)) is None:
        return None
    return float(summary.get("mean_round_seconds") or 0.0) * rounds


def train_personalised(raw: Mapping[str, Any], exp: Experiment, centres: list[str], cfg: CompareConfig,
                       seed: int, out: Path) -> dict[str, Any]:
    """Personalised FedAvg (``fedavg_ft``): FedAvg, then each hospital fine-tunes the final global
    model on its own training images (``compare.finetune_steps`` AdamW steps, warm-up and cosine
    decay from ``compare.finetune_lr``) and is tested on its own test split, at the same total compute.

    Returns:
        The job's record: ``per_image`` holds each hospital's model on that hospital's test images.
    """
    from shared_model.checkpoint import load_model_checkpoint, save_model_checkpoint
    from shared_model.training.loop import train_model

    hospitals = len(centres)
    federated = train_federated(raw, "fedavg", centres, cfg, seed, out / "federated",
                                total_steps=cfg.total_steps - cfg.finetune_steps * hospitals)
    lr = exp.train.lr if cfg.finetune_lr is None else cfg.finetune_lr
    tuned = replace(exp.train, steps=cfg.finetune_steps, seed=seed, progress=False, proximal_mu=0.0, lr=lr)
    start = time.perf_counter()
    checkpoints, per_image = {}, []
    global_model, _ = load_model_checkpoint(federated["checkpoint"])  # built once, copied per hospital
    for centre in centres:
        model = copy.deepcopy(global_model)
        result = train_model(model, comparison_dataset(exp, [centre], "train", seed), tuned, device=exp.federation.device)
        checkpoints[centre] = str(out / f"model-{centre}.pt")
        save_model_checkpoint(checkpoints[centre], model, extra={"steps": result.steps, "centres": [centre],
                                                                   "federated": federated["checkpoint"]})
        per_image += evaluate_checkpoint(exp, checkpoints[centre], [centre])["per_image"]
    return {"checkpoints": checkpoints, "federated_checkpoint": federated["checkpoint"],
            "steps": federated["steps"] + cfg.finetune_steps * hospitals,
            "seconds": federated["seconds"] + time.perf_counter() - start,
            "local_steps": federated["local_steps"], "finetune_steps": cfg.finetune_steps, "finetune_lr": lr,
            "global_val_dice_by_round": federated["global_val_dice_by_round"], "per_image": per_image}


def evaluate_checkpoint(exp: Experiment, checkpoint: str, centres: list[str],
                        extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per-image metrics of a checkpoint on each of ``centres``' test splits (masks' own resolution);
    ``extra_keys`` are kept too where the evaluation gives them (e.g. the box agreement)."""
    from shared_model.checkpoint import load_model_checkpoint
    from shared_model.training.evaluate import evaluate_model

    model, _ = load_model_checkpoint(checkpoint)
    test = comparison_dataset(exp, centres, "test")
    result = evaluate_model(model, test, device=exp.federation.device,
                            batch_size=exp.federation.eval_batch_size, resolution="original")
    keys = ("dice", "iou", "hd95", *extra_keys)
    return {"per_image": [{"centre": r["centre"], "stem": r["stem"], **{k: r[k] for k in keys if k in r}}
                          for r in result.per_image]}


def constant_baseline(exp: Experiment, train_centres: list[str], test_centres: list[str]) -> dict[str, Any]:
    """The constant-mask baseline of a job: the mean mask of the job's own training split
    (``train_centres``, not augmented; never a test mask), thresholded at the threshold best on
    it, scored per image on ``test_centres``' test splits."""
    from shared_model.training.evaluate import fit_constant_mask, score_constant_mask

    fit = fit_constant_mask(comparison_dataset(exp, train_centres, "train", augment=False, extras=False))
    scored = score_constant_mask(fit["mask"], comparison_dataset(exp, test_centres, "test"), resolution="original")
    keys = ("dice", "iou", "hd95")
    return {"baseline_fit": {"train_centres": list(train_centres), "train_images": fit["train_images"],
                             "threshold": float(fit["threshold"])},
            "baseline_per_image": [{"centre": r["centre"], "stem": r["stem"], **{k: r[k] for k in keys}}
                                   for r in scored.per_image]}
