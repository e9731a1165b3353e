"""``promptsam experiment --config FILE`` with an ``ablation:`` section: what each prompt path earns.

Every row trains the same tiny model on the pooled training split of all centres (centralized,
the same optimiser steps, batch and schedule), switching the prompt paths of
:class:`~shared_model.config.PromptConfig` on one at a time (:data:`ROWS`), and is tested on each
centre's test split at the masks' own resolution, next to the constant-mask baseline. Seeds vary
the training (initialisation of the trainable parts stays the model's ``init_seed``; data order,
augmentation and noise follow ``train.seed``). Rows whose box prompts come from the saliency also
report how often those boxes find the polyp (box IoU >= 0.5 with the mask's box, and the fraction
of polyp pixels inside the boxes).

The step time of each row is measured apart from training (:func:`time_rows`: one step of every
row on the same batch, interleaved, 1 thread), as training times depend on what else the machine
runs. Output folder: ``config.yaml`` (resolved), ``results.json`` (after every job, so an
interrupted ablation resumes), ``ablation.md`` and ``ablation.csv``.
"""

from __future__ import annotations

import copy
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from shared_model.config import ConfigError, blame_overrides, from_dict, load_yaml, merge, to_dict
from shared_model.config import model_config_from_dict
from shared_model.config.experiment import Experiment, apply_overrides, parse_experiment

# Row name -> (label, model overrides). Each row adds one part to the one before it, except the
# last two, which replace the saliency boxes by the box of SAM's own first-pass mask (a two-pass
# cascade) and by each ground-truth mask's enclosing box (a clinician's box).
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "samed": ("SAMed-style (LoRA, no prompt)",
              {"prompts": {"text_tokens": 0, "dense_saliency": False, "use_boxes": False},
               "crf": {"enabled": False}}),
    "text": ("+ text -> sparse tokens",
             {"prompts": {"dense_saliency": False, "use_boxes": False}, "crf": {"enabled": False}}),
    "saliency-dense": ("+ saliency -> dense prompt", {"prompts": {"use_boxes": False}, "crf": {"enabled": False}}),
    "saliency-boxes": ("+ boxes from saliency", {"crf": {"enabled": False}}),
    "full": ("full (+ CRF)", {}),
    "mask-boxes": ("full, boxes from SAM's own first mask (two passes)", {"prompts": {"box_source": "mask"}}),
    "user-boxes": ("full, ground-truth boxes", {"prompts": {"box_source": "ground-truth"}}),
}
BOX_KEYS = ("box_iou", "box_hit", "box_coverage")


@dataclass
class AblationConfig:
    """The ``ablation:`` section of an experiment file."""

    rows: list[str] = field(default_factory=lambda: list(ROWS))
    steps: int = 1000  # optimiser steps of one batch per row and seed
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    workers: int = 1  # jobs trained at once (processes; each gets cores / workers torch threads)


def load_ablation(path: str | Path, overrides: Mapping[str, Any] | None = None
                  ) -> tuple[Experiment, AblationConfig, dict[str, Any]]:
    """Parse an experiment file with an ``ablation:`` section (errors name the file and field)."""
    raw = load_yaml(path)

    def parse(data: dict[str, Any]) -> tuple[Experiment, AblationConfig, dict[str, Any]]:
        try:
            cfg = from_dict(AblationConfig, data.pop("ablation", None) or {}, "ablation")
            unknown = [r for r in cfg.rows if r not in ROWS]
            if unknown or not cfg.rows:
                raise ConfigError(f"ablation.rows: unknown or no rows {unknown}; choose from {list(ROWS)}")
            for name in ("steps", "workers"):
                if getattr(cfg, name) < 1:
                    raise ConfigError(f"ablation.{name}: must be >= 1, got {getattr(cfg, name)}")
            if not cfg.seeds:
                raise ConfigError("ablation.seeds: give at least one seed")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        return parse_experiment(data, str(path)), cfg, data

    try:
        exp, cfg, data = parse(apply_overrides(raw, overrides))
    except ConfigError as err:
        if not overrides:
            raise
        raise blame_overrides(err, str(path), overrides, lambda: parse(apply_overrides(raw, None))) from None
    data.setdefault("data", {})["root"] = exp.data.root
    return exp, cfg, data


def row_model(exp: Experiment, row: str) -> dict[str, Any]:
    """The experiment's model section with ``row``'s switches applied (a dict, as in the YAML)."""
    return to_dict(merge(model_config_from_dict(exp.model), ROWS[row][1], "model"))


def run_job(raw: dict[str, Any], row: str, seed: int, centres: list[str], steps: int, out: str,
            threads: int) -> dict[str, Any]:
    """Train one row with one seed and test it on every centre (runs in a worker process)."""
    import torch

    from simulation.compare_jobs import evaluate_checkpoint, train_single_site

    torch.set_num_threads(threads)
    exp = parse_experiment(copy.deepcopy(raw), f"ablation row {row}")
    exp.model = row_model(exp, row)
    job_dir = Path(out)
    job_dir.mkdir(parents=True, exist_ok=True)
    info = train_single_site(exp, centres, steps, seed, job_dir)
    info.update(evaluate_checkpoint(exp, info["checkpoint"], centres, extra_keys=BOX_KEYS))
    from shared_model.checkpoint import load_model_checkpoint
    from shared_model.exchange import trainable_names

    model, _ = load_model_checkpoint(info["checkpoint"])
    params = dict(model.named_parameters())
    info["trainable"] = sum(params[n].numel() for n in trainable_names(model))
    info["seconds_per_step"] = info["seconds"] / max(1, info["steps"])
    return info


def time_rows(raw: dict[str, Any], rows: list[str], batch_size: int, warmup: int = 2, repeats: int = 7,
              threads: int = 1) -> dict[str, Any]:
    """One training step (forward, backward, AdamW) of every row's model on the same batch, timed
    interleaved (:func:`~shared_model.benchmarks.timing.interleaved`), so that load changes hit
    every row alike; ratios to the SAMed-style row (or the first row) are paired by repeat.

    Returns:
        ``{"threads", "batch_size", "warmup", "repeats", "load_average": [start, end], "rows":
        {row: {"wall", "cpu"} spreads, "ratio": paired wall-time ratio to the reference}}}``.
    """
    import torch

    from shared_model.benchmarks.record import load_average
    from shared_model.benchmarks.timing import interleaved, paired_ratio
    from shared_model.config import model_config_from_dict
    from shared_model.modeling.prompt_sam import build_model

    torch.set_num_threads(threads)
    exp = parse_experiment(copy.deepcopy(raw), "ablation timing")
    size = model_config_from_dict(exp.model).sam.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, size, size, generator=gen)
    masks = torch.zeros(batch_size, 1, size, size)
    masks[:, :, size // 4: size // 2, size // 3: 2 * size // 3] = 1
    texts = ["polyp"] * batch_size

    def step_fn(row: str):
        model = build_model(model_config_from_dict(row_model(exp, row))).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            loss, _ = model.compute_losses(model(images, texts, **model.oracle_prompts(masks)), masks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    start = load_average()
    timed = interleaved({row: step_fn(row) for row in rows}, warmup, repeats)
    reference = "samed" if "samed" in rows else rows[0]
    for row in rows:
        timed[row]["ratio"] = paired_ratio(timed[row]["wall"]["all"], timed[reference]["wall"]["all"])
    return {"threads": threads, "batch_size": batch_size, "warmup": warmup, "repeats": repeats,
            "reference": reference, "load_average": [start, load_average()], "rows": timed}


def run_ablation(config: str | Path, out: str | Path, overrides: Mapping[str, Any] | None = None,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the ablation into ``out``; return its results and write the tables.

    Raises:
        ConfigError: A bad experiment file, or ``out`` holds an ablation of another config.
    """
    from simulation.compare_jobs import constant_baseline
    from simulation.comparison import centres_of, environment

    exp, cfg, raw = load_ablation(config, overrides)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    centres = centres_of(exp)
    raw["data"]["centres"] = exp.data.centres = centres
    resolved = {**copy.deepcopy(raw), "ablation": to_dict(cfg)}
    config_path = out / "config.yaml"
    if config_path.is_file() and yaml.safe_load(config_path.read_text()) != resolved:
        raise ConfigError(f"{out}: holds an ablation of another configuration ({config_path}); choose another --out")
    config_path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("environment", environment())
    jobs = results.setdefault("jobs", {})
    if "baseline" not in results:
        results["baseline"] = constant_baseline(exp, centres, centres)
        results_path.write_text(json.dumps(results, indent=1))
    todo = [(row, seed) for seed in cfg.seeds for row in cfg.rows if f"{row}/seed-{seed}" not in jobs]
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    echo(f"ablation: {len(todo)} job(s) to train ({len(jobs)} done), {cfg.steps} steps each, "
         f"{cfg.workers} worker(s) x {threads} thread(s)")

    def record(row: str, seed: int, info: dict[str, Any]) -> None:
        jobs[f"{row}/seed-{seed}"] = {"row": row, "seed": seed, **info}
        results_path.write_text(json.dumps(results, indent=1))
        echo(f"    {row} seed {seed}: {info['steps']} steps, {info['seconds_per_step']:.3f} s/step, "
             f"test Dice {np.mean([r['dice'] for r in info['per_image']]):.4f}")

    args = [(raw, row, seed, centres, cfg.steps, str(out / "jobs" / f"{row}_seed-{seed}"), threads)
            for row, seed in todo]
    if cfg.workers == 1:
        for a in args:
            record(a[1], a[2], run_job(*a))
    else:
        import multiprocessing

        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, *a): a for a in args}
            for future in as_completed(futures):
                a = futures[future]
                record(a[1], a[2], future.result())
    if set(results.get("step_time", {}).get("rows", {})) != set(cfg.rows):
        echo("timing one training step of every row, interleaved ...")
        results["step_time"] = time_rows(raw, cfg.rows, exp.train.batch_size)
        results_path.write_text(json.dumps(results, indent=1))
    from simulation.ablation_report import write_tables

    files = write_tables(out, results, cfg, centres, exp, {row: label for row, (label, _) in ROWS.items()})
    echo("wrote " + ", ".join(str(f) for f in files))
    return results
