"""``promptsam fewshot --config FILE --out DIR``: a held-out task learned from K examples.

Leave one task out: the base model is a foundation pre-trained without the task (the tiny
foundation never saw polyps; the provenance of a foundation folder is checked when it has one).
For every K of ``fewshot.shots`` and every draw of ``fewshot.draws``, a support set of K pairs is
drawn (seeded) from the task's training split (pairs with a foreground only), and the task's test
split is scored, at each mask's own resolution, for each method:

* ``in-context``: the frozen base prompted by the support set (:mod:`shared_model.fewshot.incontext`);
* ``adapter``: a task adapter trained on the support set (:mod:`shared_model.fewshot.adapt`);
* ``fine-tune``: the same K images train everything hospitals normally train (the base's own
  exchanged state: encoder LoRA, context vectors, prompt projections, ...), same steps;

next to the upper bound: a model trained on the task's whole training split (a checkpoint given as
``fewshot.upper_bound.checkpoint`` / ``--upper-bound``, else trained here from the base). Output:
``base.pt``, ``adapters/``, ``results.json`` (after every job: an interrupted run resumes),
``summary.json``, ``table.md`` and ``dice_vs_k.png`` (:mod:`simulation.fewshot_report`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from shared_model.config import AdapterConfig, ConfigError, DataConfig, TrainConfig, check_data, check_train
from shared_model.config import blame_overrides, from_dict, load_yaml, model_config_from_dict
from shared_model.config.experiment import PROJECT_ROOT, apply_overrides
from shared_model.modeling.foundation import foundation_folder

METHODS = ("in-context", "adapter", "fine-tune")
SECTIONS = ("name", "model", "data", "fewshot")


@dataclass
class InContextSettings:
    temperature: float = 0.1
    threshold: float = 0.5
    click: bool = True


@dataclass
class UpperBoundSettings:
    checkpoint: str = ""  # trained on the task's whole training split; "" = train it here with `train`
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000, batch_size=8, lr=3e-3))


@dataclass
class FewShotSettings:
    """The ``fewshot:`` section."""

    task_name: str = ""  # the held-out task's name (its text prompt); "" = the data's class name
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    draws: int = 3
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    augment: bool = True
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    adapter_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=4, lr=3e-3,
                                                                           weight_decay=0.0, warmup_steps=10))
    finetune_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=4, lr=3e-3,
                                                                            warmup_steps=10))
    in_context: InContextSettings = field(default_factory=InContextSettings)
    upper_bound: UpperBoundSettings = field(default_factory=UpperBoundSettings)
    max_test_images: int = 0  # 0 = the whole test split (smoke runs score a seeded subset)
    eval_batch_size: int = 8


@dataclass
class FewShotExperiment:
    name: str
    model: dict[str, Any]
    data: DataConfig
    fewshot: FewShotSettings
    raw: dict[str, Any]


def _project_path(path: str | None) -> str | None:
    """A relative path resolved against the project root (configs name repository files)."""
    if not path or Path(path).is_absolute():
        return path
    return str((PROJECT_ROOT / path).resolve())


def parse_fewshot(data: dict[str, Any], source: str) -> FewShotExperiment:
    """Parse a few-shot evaluation file strictly (errors name ``source`` and the dotted field)."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; valid: {list(SECTIONS)}")
    try:
        model = copy.deepcopy(dict(data.get("model") or {"preset": "tiny"}))
        for part in ("sam", "clip"):
            if isinstance(model.get(part), dict) and model[part].get("checkpoint"):
                model[part]["checkpoint"] = _project_path(model[part]["checkpoint"])
        model_config_from_dict(model)
        cfg = from_dict(FewShotSettings, data.get("fewshot") or {}, "fewshot")
        exp = FewShotExperiment(str(data.get("name") or Path(source).stem), model,
                                from_dict(DataConfig, data.get("data") or {}, "data"), cfg, data)
        check_data(exp.data, "data.")
        bad = [m for m in cfg.methods if m not in METHODS]
        if bad or not cfg.methods:
            raise ConfigError(f"fewshot.methods: unknown or none {bad}; choose from {list(METHODS)}")
        if not cfg.shots or any(k < 1 for k in cfg.shots):
            raise ConfigError(f"fewshot.shots: give counts >= 1, got {cfg.shots}")
        for name, ok in (("draws", cfg.draws >= 1), ("max_test_images", cfg.max_test_images >= 0),
                         ("eval_batch_size", cfg.eval_batch_size >= 1), ("in_context.temperature",
                                                                          cfg.in_context.temperature > 0)):
            if not ok:
                raise ConfigError(f"fewshot.{name}: out of range")
        for name in ("adapter_train", "finetune_train"):
            check_train(getattr(cfg, name), f"fewshot.{name}.")
        check_train(cfg.upper_bound.train, "fewshot.upper_bound.train.")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    exp.data.root = _project_path(exp.data.root)
    exp.data.augment = False
    cfg.upper_bound.checkpoint = _project_path(cfg.upper_bound.checkpoint) or ""
    return exp


def load_fewshot(path: str | Path, overrides: Mapping[str, Any] | None = None) -> FewShotExperiment:
    """Read a few-shot evaluation YAML with dotted ``--set`` overrides."""
    raw = load_yaml(path)
    try:
        return parse_fewshot(apply_overrides(raw, overrides), str(path))
    except ConfigError as err:
        if not overrides:
            raise
        raise blame_overrides(err, str(path), overrides, lambda: parse_fewshot(raw, str(path))) from None


def check_held_out(exp: FewShotExperiment) -> str:
    """Why the task is held out from the base: the foundation's provenance lists its data.

    Raises:
        ConfigError: The foundation folder's provenance names the task's data among its sources.
    """
    foundation = exp.model.get("foundation")  # a packaged name or a folder
    if isinstance(foundation, str) and foundation:
        folder = foundation_folder(foundation)
    else:
        sam_ckpt = (exp.model.get("sam") or {}).get("checkpoint")
        if not sam_ckpt:
            return "base from random init (no foundation): every task is held out"
        folder = Path(sam_ckpt).parent
    prov_path = folder / "provenance.json"
    if not prov_path.is_file():
        return f"no provenance.json in {folder}: held-out status not checked"
    prov = json.loads(prov_path.read_text())
    sources = (prov.get("data") or {}).get("sources") or []
    mine = Path(exp.data.root).resolve()
    for src in sources:
        root = Path(src.get("root", ""))
        root = root if root.is_absolute() else (PROJECT_ROOT / root).resolve()
        if root == mine or (exp.data.centres and set(exp.data.centres) & set(src.get("centres") or [])):
            raise ConfigError(f"data.root: {mine} is among the foundation's pre-training data ({prov_path}): "
                              "not a held-out task")
    used = ", ".join(f"{s.get('task')} ({', '.join(s.get('centres') or [])})" for s in sources)
    return f"held out: the foundation ({prov_path.parent}) was pre-trained on {used} and scenes, never on {mine}"


def draw_seed(seed: int, shots: int, draw: int) -> int:
    """Seed of one support draw, from ``(seed, K, draw)``."""
    return int(np.random.SeedSequence([seed, shots, draw]).generate_state(1)[0] & 0x7FFFFFFF)


def _test_set(exp: FewShotExperiment, image_size: int, resize: str, name: str):
    from shared_model.data.dataset import evaluation_dataset
    from shared_model.data.splits import build_splits

    splits = build_splits(exp.data)[0]
    test = list(splits["test"])
    limit = exp.fewshot.max_test_images
    if limit and limit < len(test):
        keep = sorted(np.random.default_rng(exp.fewshot.seed).choice(len(test), limit, replace=False))
        test = [test[i] for i in keep]
    if not test:
        raise ConfigError(f"data: the test split of {exp.data.root} is empty")
    return splits["train"], evaluation_dataset(test, image_size, "class", name, resize=resize)


def _evaluate(model, test, batch_size: int) -> dict[str, float]:
    from shared_model.training.evaluate import evaluate_model

    agg = evaluate_model(model, test, device="cpu", batch_size=batch_size, resolution="original").aggregate
    return {k: float(agg[k]) for k in ("dice", "dice_std", "iou", "hd95", "n") if k in agg}


def run_fewshot(config: str | Path, out: str | Path, overrides: Mapping[str, Any] | None = None,
                upper_bound: str | None = None) -> dict[str, Any]:
    """Run the evaluation of the module docstring; returns the summary (also ``summary.json``)."""
    import torch

    from shared_model.checkpoint import load_model_checkpoint, save_model_checkpoint
    from shared_model.fewshot.adapt import adapt
    from shared_model.fewshot.incontext import InContextSAM
    from shared_model.fewshot.support import foreground_pool, load_support
    from shared_model.modeling.prompt_sam import build_model
    from shared_model.training.loop import train_model
    from simulation.fewshot_report import write_outputs

    exp = load_fewshot(config, overrides)
    cfg = exp.fewshot
    if upper_bound:
        cfg.upper_bound.checkpoint = str(Path(upper_bound).resolve())
    held_out = check_held_out(exp)
    out = Path(out)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(apply_overrides(exp.raw, overrides), sort_keys=False))
    base_path = out / "base.pt"
    base = build_model(model_config_from_dict(exp.model))
    if not base_path.is_file():
        save_model_checkpoint(base_path, base, {"fewshot_base": True})
    name = cfg.task_name or exp.data.class_name or "polyp"
    s, resize = base.image_size, base.cfg.sam.input_resize
    train_samples, test = _test_set(exp, s, resize, name)
    pool = foreground_pool(train_samples)
    print(held_out, flush=True)
    print(f"task \"{name}\": support pool {len(pool)} training pair(s) with a foreground, test {len(test)} image(s)",
          flush=True)
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def record(key: str, row: dict[str, Any]) -> None:
        results[key] = row
        results_path.write_text(json.dumps(results, indent=2))
        print(f"{key}: dice {row['dice']:.4f}" + (f", trained in {row['train_seconds']:.1f} s"
                                                   if row.get("train_seconds") is not None else ""), flush=True)

    if "upper-bound" not in results:
        if cfg.upper_bound.checkpoint:
            model, _ = load_model_checkpoint(cfg.upper_bound.checkpoint)
            info = {"checkpoint": cfg.upper_bound.checkpoint, "train_seconds": None}
        else:
            from shared_model.data.dataset import PolypDataset

            model, _ = load_model_checkpoint(base_path)
            data = PolypDataset(train_samples, s, augment=cfg.augment, prompt_mode="class", class_name=name,
                                resize=resize)
            result = train_model(model, data, cfg.upper_bound.train)
            path = save_model_checkpoint(out / "upper_bound.pt", model, {"train_images": len(train_samples)})
            info = {"checkpoint": str(path), "train_seconds": result.seconds, "steps": result.steps}
        record("upper-bound", {"method": "upper-bound", "shots": len(train_samples), **info,
                               **_evaluate(model, test, cfg.eval_batch_size)})
    for shots in cfg.shots:
        if shots > len(pool):
            raise ConfigError(f"fewshot.shots: {shots} is more than the {len(pool)} training pair(s) with a foreground")
        for draw in range(cfg.draws):
            seed = draw_seed(cfg.seed, shots, draw)
            support = load_support(exp.data.root, shots, name, seed=seed, samples=pool,
                                   shots_flag="fewshot.shots")
            for method in cfg.methods:
                key = f"{method}/K={shots}/draw={draw}"
                if key in results:
                    continue
                row: dict[str, Any] = {"method": method, "shots": shots, "draw": draw, "seed": seed,
                                       "support": [smp.key for smp in support.samples], "train_seconds": None}
                model, _ = load_model_checkpoint(base_path)
                if method == "in-context":
                    ic = cfg.in_context
                    model = InContextSAM(model, support.dataset(s, resize=resize), name, ic.temperature,
                                         ic.threshold, ic.click)
                elif method == "adapter":
                    train = copy.deepcopy(cfg.adapter_train)
                    train.seed, train.progress = seed, False
                    path = out / "adapters" / f"K{shots}_draw{draw}.pt"
                    result = adapt(model, support, path, base_path, train, cfg.adapter, augment=cfg.augment)
                    row.update(train_seconds=result.train.seconds, adapter_file_bytes=result.file_bytes,
                               adapter_values=result.parameters, adapter=str(path))
                else:
                    train = copy.deepcopy(cfg.finetune_train)
                    train.seed, train.progress = seed, False
                    data = support.dataset(s, augment=cfg.augment, seed=seed, resize=resize)
                    result = train_model(model, data, train)
                    row.update(train_seconds=result.seconds,
                               trained_values=sum(p.numel() for p in model.parameters() if p.requires_grad))
                torch.manual_seed(0)
                record(key, {**row, **_evaluate(model, test, cfg.eval_batch_size)})
    summary = write_outputs(out, results, exp, name, held_out, len(test))
    return summary


__all__ = ["FewShotSettings", "METHODS", "draw_seed", "load_fewshot", "parse_fewshot", "run_fewshot"]
