"""``promptsam experiment --config FILE``: is federation worth it? One table answers.

On by-centre data (one hospital per centre) it trains, with the same model, the same
hyper-parameters and the same total compute (``compare.total_steps`` optimiser steps of one batch,
summed over every site), and evaluates each model on every centre's test split:

* ``centralized``: one model on the pooled training images (``total_steps`` steps);
* ``local``: one model per hospital on its own images only (``total_steps / H`` steps each);
* ``fedavg`` / ``fedprox``: ``rounds`` Flower rounds of ``total_steps / (rounds x H)`` local steps
  per hospital, through the real ServerApp and ClientApp (:class:`InProcessGrid`: Flower's
  messages serialised as on the wire, no transport);
* ``fedavg_ft`` (personalised FedAvg): FedAvg with ``total_steps - H x finetune_steps`` steps, then
  each hospital fine-tunes the final global model on its own images for ``finetune_steps`` steps
  and keeps that model; each is tested on its own hospital's test split.

With ``compare.leave_one_out`` every method of ``leave_one_out_methods`` is trained again on all
centres but one and tested on the held-out centre's test split (the same images as in the main
table, so the gap is the domain shift). Every model is the final one (no selection on test data).
The experiment file is an ordinary simulation experiment (see :mod:`simulation.experiment`) plus a
``compare:`` section (:class:`CompareConfig`); the output folder gets the resolved config, the
environment, ``results.json`` (written after every training job, so an interrupted experiment
resumes where it stopped), ``table.md``, ``table.csv`` and plots (:mod:`simulation.comparison_report`).
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from shared_model.config import ConfigError, from_dict, load_yaml, to_dict
from shared_model.config.experiment import Experiment, apply_overrides, parse_experiment, source_commit
from shared_model.config import blame_overrides
from simulation.compare_jobs import (
    comparison_dataset,
    constant_baseline,
    evaluate_checkpoint,
    train_federated,
    train_personalised,
    train_single_site,
)

log = logging.getLogger(__name__)

METHODS = ("centralized", "local", "fedavg", "fedprox", "fedavg_ft")
FEDERATED = ("fedavg", "fedprox")
PERSONALISED = ("fedavg_ft",)  # one model per hospital, each tested on its own centre only


@dataclass
class CompareConfig:
    """The ``compare:`` section of an experiment file."""

    methods: list[str] = field(default_factory=lambda: list(METHODS[:4]))  # fedavg_ft on request
    total_steps: int = 450  # optimiser steps summed over all sites, the same for every method
    rounds: int = 3  # federated rounds (local steps = total_steps / (rounds x hospitals))
    proximal_mu: float = 0.01  # fedprox
    finetune_steps: int = 50  # fedavg_ft: local steps per hospital after the federated rounds
    finetune_lr: float | None = None  # fedavg_ft: peak learning rate of the fine-tuning (None: train.lr)
    leave_one_out: bool = True
    leave_one_out_methods: list[str] = field(default_factory=lambda: ["centralized", "fedavg", "fedprox"])
    seeds: list[int] = field(default_factory=lambda: [0])  # training seeds (train.seed, federation.seed)
    prompt_styles: bool = True  # evaluate one model with several text-prompt styles
    prompt_model: str = "fedavg"  # which method's model (trained on all centres, first seed)


@dataclass
class Job:
    """One training job: a method trained on some centres with one seed."""

    setting: str  # "all" or "loo-<held-out centre>"
    method: str  # a METHOD, or "local" for one hospital (``centres`` has one entry)
    centres: list[str]
    seed: int

    @property
    def key(self) -> str:
        who = f"local-{self.centres[0]}" if self.method == "local" else self.method
        return f"{self.setting}/{who}/seed-{self.seed}"


def load_comparison(path: str | Path, overrides: Mapping[str, Any] | None = None
                    ) -> tuple[Experiment, CompareConfig, dict[str, Any]]:
    """Parse an experiment file with a ``compare:`` section.

    Returns:
        ``(experiment, compare, raw)``: ``raw`` is the file's mapping after overrides, without
        ``compare``, with ``data.root`` made absolute (what every job is built from).

    Raises:
        ConfigError: Naming the file and the field.
    """
    raw = load_yaml(path)

    def parse(data: dict[str, Any]) -> tuple[Experiment, CompareConfig, dict[str, Any]]:
        try:
            compare = from_dict(CompareConfig, data.pop("compare", None) or {}, "compare")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        exp = parse_experiment(data, str(path))
        try:
            check_compare(compare, exp)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        return exp, compare, data

    try:
        exp, compare, data = parse(apply_overrides(raw, overrides))
    except ConfigError as err:
        if not overrides:
            raise
        raise blame_overrides(err, str(path), overrides, lambda: parse(apply_overrides(raw, None))) from None
    data.setdefault("data", {})["root"] = exp.data.root
    return exp, compare, data


def centres_of(exp: Experiment) -> list[str]:
    """The experiment's centres (``data.centres``, else every centre folder under the root)."""
    from shared_model.data.sources import list_config_samples

    if exp.data.centres:
        return list(exp.data.centres)
    samples, _ = list_config_samples(exp.data)
    return sorted({s.centre for s in samples})


def check_compare(cfg: CompareConfig, exp: Experiment) -> None:
    """Cross-field checks; errors name the ``compare.`` field."""
    for name in ("methods", "leave_one_out_methods"):
        unknown = sorted(set(getattr(cfg, name)) - set(METHODS))
        if unknown:
            raise ConfigError(f"compare.{name}: unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not cfg.methods:
        raise ConfigError("compare.methods: empty")
    if "local" in cfg.leave_one_out_methods:
        raise ConfigError("compare.leave_one_out_methods: 'local' trains on one centre; the main table "
                          "already tests each local model on the other centres")
    if set(PERSONALISED) & set(cfg.leave_one_out_methods):
        raise ConfigError("compare.leave_one_out_methods: 'fedavg_ft' fine-tunes at each hospital on its own "
                          "images; a held-out centre has none")
    if exp.partition.mode != "centre":
        raise ConfigError("partition.mode: the comparison needs one hospital per centre ('centre')")
    if not cfg.seeds:
        raise ConfigError("compare.seeds: give at least one seed")
    if cfg.rounds < 1:
        raise ConfigError("compare.rounds: must be >= 1")
    if cfg.prompt_styles and (cfg.prompt_model not in cfg.methods or cfg.prompt_model in ("local", *PERSONALISED)):
        raise ConfigError(f"compare.prompt_model: {cfg.prompt_model!r} must be one of compare.methods "
                          "that gives one model trained on all centres (not 'local' or 'fedavg_ft')")
    hospitals = exp.simulation.num_supernodes
    if cfg.total_steps < cfg.rounds * hospitals:
        raise ConfigError(f"compare.total_steps: {cfg.total_steps} gives no local step per round "
                          f"({cfg.rounds} rounds x {hospitals} hospitals)")
    if "fedavg_ft" in cfg.methods:
        if cfg.finetune_steps < 1:
            raise ConfigError("compare.finetune_steps: must be >= 1")
        if cfg.finetune_lr is not None and cfg.finetune_lr <= 0:
            raise ConfigError("compare.finetune_lr: must be > 0 (or null for train.lr)")
        if cfg.total_steps - cfg.finetune_steps * hospitals < cfg.rounds * hospitals:
            raise ConfigError(f"compare.finetune_steps: {cfg.finetune_steps} x {hospitals} hospitals leaves no "
                              f"federated step per round of compare.total_steps {cfg.total_steps}")


def plan(cfg: CompareConfig, centres: list[str]) -> list[Job]:
    """Every training job of the comparison, in the order they run."""
    jobs: list[Job] = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            if method == "local":
                jobs += [Job("all", "local", [c], seed) for c in centres]
            else:
                jobs.append(Job("all", method, list(centres), seed))
        if cfg.leave_one_out and len(centres) > 1:
            for held_out in centres:
                rest = [c for c in centres if c != held_out]
                jobs += [Job(f"loo-{held_out}", m, rest, seed) for m in cfg.leave_one_out_methods]
    return jobs


# -- the experiment ----------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """What else a repeat needs: versions, commit, machine."""
    import flwr

    return {"torch": torch.__version__, "flwr": flwr.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "commit": source_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_comparison(config: str | Path, out: str | Path, overrides: Mapping[str, Any] | None = None,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the comparison into ``out``; return the results (see :mod:`comparison_report`).

    Raises:
        ConfigError: Bad experiment file, or ``out`` holds a comparison of another config.
    """
    from simulation.comparison_report import write_outputs

    exp, cfg, raw = load_comparison(config, overrides)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if exp.synthetic is not None:
        from shared_model.data.synthetic import generate_dataset

        syn = exp.synthetic
        if not (out / "data").is_dir():
            generate_dataset(out / "data", centres=syn.centres, per_centre=syn.per_centre,
                             image_size=syn.image_size, seed=syn.seed)
        exp.data.root = raw["data"]["root"] = str(out / "data")
        raw.pop("synthetic", None)
    centres = centres_of(exp)
    raw["data"]["centres"] = exp.data.centres = centres
    resolved = {**copy.deepcopy(raw), "compare": to_dict(cfg)}
    config_path = out / "config.yaml"
    if config_path.is_file() and yaml.safe_load(config_path.read_text()) != resolved:
        raise ConfigError(f"{out}: holds a comparison of another configuration ({config_path}); "
                          "choose another --out")
    config_path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("environment", environment())
    jobs = results.setdefault("jobs", {})
    todo = plan(cfg, centres)
    hospitals = len(centres)
    baselines: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[str, Any]] = {}

    def baseline(train_centres: list[str], test_centres: list[str]) -> dict[str, Any]:
        key = (tuple(train_centres), tuple(test_centres))
        if key not in baselines:
            baselines[key] = constant_baseline(exp, train_centres, test_centres)
        return baselines[key]

    for i, job in enumerate(todo, 1):
        test_centres = centres if job.setting == "all" else [job.setting.removeprefix("loo-")]
        if job.key in jobs:
            if "baseline_per_image" not in jobs[job.key]:  # results of an older version
                jobs[job.key].update(baseline(job.centres, test_centres))
                results_path.write_text(json.dumps(results, indent=1))
            continue
        echo(f"[{i}/{len(todo)}] {job.key}: training on {', '.join(job.centres)}")
        job_dir = out / "jobs" / job.key.replace("/", "_")
        job_dir.mkdir(parents=True, exist_ok=True)
        if job.method in PERSONALISED:
            info = train_personalised(raw, exp, job.centres, cfg, job.seed, job_dir)
            own = [baseline([c], [c]) for c in job.centres]  # each hospital's own constant mask
            info.update(baseline_fit=[b["baseline_fit"] for b in own],
                        baseline_per_image=[r for b in own for r in b["baseline_per_image"]])
        else:
            if job.method in FEDERATED:
                info = train_federated(raw, job.method, job.centres, cfg, job.seed, job_dir)
            else:
                steps = cfg.total_steps // hospitals if job.method == "local" else cfg.total_steps
                info = train_single_site(exp, job.centres, steps, job.seed, job_dir)
            info.update(evaluate_checkpoint(exp, info["checkpoint"], test_centres))
            info.update(baseline(job.centres, test_centres))
        info["eval_prompt"] = exp.data.eval_prompt
        jobs[job.key] = {"setting": job.setting, "method": job.method, "centres": job.centres,
                         "seed": job.seed, **info}
        results_path.write_text(json.dumps(results, indent=1))
        echo(f"    {info['steps']} steps in {info['seconds']:.0f} s; test Dice "
             f"{_mean(info['per_image'], 'dice'):.4f} on {', '.join(test_centres)}")
    if cfg.prompt_styles and "prompt_styles" not in results:
        results["prompt_styles"] = prompt_style_results(exp, jobs, cfg, centres)
        results_path.write_text(json.dumps(results, indent=1))
    files = write_outputs(out, results, cfg, centres, exp.train.batch_size)
    echo("wrote " + ", ".join(str(f) for f in files))
    return results


def prompt_style_results(exp: Experiment, jobs: dict[str, Any], cfg: CompareConfig,
                         centres: list[str]) -> dict[str, Any]:
    """Dice of one trained model (``compare.prompt_model``) on the pooled test split per prompt style."""
    from shared_model.checkpoint import load_model_checkpoint
    from shared_model.training.evaluate import evaluate_prompt_styles

    key = Job("all", cfg.prompt_model, centres, cfg.seeds[0]).key
    model, _ = load_model_checkpoint(jobs[key]["checkpoint"])
    test = comparison_dataset(exp, centres, "test")
    styles = evaluate_prompt_styles(model, test, device=exp.federation.device,
                                    batch_size=exp.federation.eval_batch_size, resolution="original")
    return {"model": key, "styles": styles}


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else float("nan")
