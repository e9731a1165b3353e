"""The server's round loop: train, federated evaluation, global evaluation, log, checkpoint.

It follows ``flwr.serverapp.strategy.Strategy.start`` (configure_train -> send and receive ->
aggregate_train -> configure_evaluate -> send and receive -> aggregate_evaluate -> evaluate_fn),
receiving with :func:`server.collect.send_and_collect` (the deadline, and which sampled node did
not reply), but can start at any round, so that ``resume`` continues from the last checkpoint. Node sampling
(Python's ``random``) is reseeded from ``(seed, round)`` every round, and client seeds depend on
``(seed, round, partition)`` only, so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from client.task import client_seed, train_metric_keys
from client.wire import record_to_state, state_to_record
from server.checkpoint import CHECKPOINT_NAME, ResumeError, ServerCheckpoint, check_resumable, load_checkpoint, save_checkpoint
from server.html_report import write_reports
from server.report import AUDIT_NAME, METRICS_NAME, JsonLines
from server.privacy import check_privacy_strategy, declined, privacy_summary, round_privacy, wrap_central_dp
from server.collect import send_and_collect
from server.replies import DROP_KINDS
from server.strategy import GuardedStrategy, build_inner_strategy
from shared_model.config import ConfigError, DataConfig, RunSettings
from shared_model.exchange import check_state, get_exchanged_state, set_exchanged_state, state_shapes

log = logging.getLogger("flwr.promptsam." + __name__)  # shown by Flower's console handler

GLOBAL_METRICS = ("dice", "iou", "hd95", "precision", "recall", "n")
RUN_CONFIG_NAME = "run_config.json"


class FederatedServer:
    """One federated run: model, strategy, evaluation sets, logs and checkpoints in ``run-dir``.

    Args:
        settings: Parsed run config.
        run_config: The raw run config (stored in checkpoints).
    """

    def __init__(self, settings: RunSettings, run_config: dict[str, Any] | None = None) -> None:
        from shared_model.fewshot.federated import build_run_model

        fed = settings.federation
        if not fed.run_dir:
            raise ConfigError("run-dir: the server needs a folder for checkpoints, metrics and the report")
        self.settings = settings
        self.run_config = dict(run_config or {})
        self.run_dir = Path(fed.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model = build_run_model(settings)
        self.shapes = state_shapes(self.model)
        if settings.adapter.enabled:
            from server.adapter import describe_adapter

            log.info(describe_adapter(self.model, fed.wire_dtype))
        check_privacy_strategy(settings)
        inner = wrap_central_dp(build_inner_strategy(fed), settings.privacy, fed, settings.partition)
        self.strategy = GuardedStrategy(inner, self.shapes, fed.wire_dtype, fed.max_update_norm, fed.server_lr,
                                        train_metric_keys(settings))
        self.eval_set, self.test_set = self._eval_sets()
        self.hospital_names = self._hospital_names()
        self.metrics = JsonLines(self.run_dir / METRICS_NAME)
        self.audit = JsonLines(self.run_dir / AUDIT_NAME)

    # -- data --------------------------------------------------------------------------------

    def _eval_sets(self):
        """Global evaluation set (``global-eval``) and, when that is ``val``, the pooled test set.

        Raises:
            ConfigError: Naming ``global-eval`` when its data cannot be read (in deployment the
                server usually holds no hospital data: use ``none`` or a held-out folder).
        """
        from shared_model.data.folder import DataError

        try:
            return evaluation_sets(self.settings)
        except (DataError, OSError) as err:
            raise ConfigError(f"global-eval={self.settings.federation.global_eval!r}: {err}") from None

    def _hospital_names(self) -> dict[int, str]:
        part = self.settings.partition
        if part.hospitals <= 0:
            return {}
        from shared_model.data.partition import hospital_splits

        sites = hospital_splits(self.settings.data, part, part.hospitals)
        return {i: site.name for i, site in enumerate(sites)}

    def _name(self, row: dict[str, Any]) -> str:
        pid = int(row.get("partition-id", -1))
        if pid in self.hospital_names:
            return self.hospital_names[pid]
        return f"site-{pid}" if pid >= 0 else f"node-{row['node-id']}"

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, state: "OrderedDict[str, torch.Tensor]", dataset=None) -> dict[str, float] | None:
        """Dice/IoU/HD95/precision/recall of ``state`` on the global evaluation set (or ``dataset``)."""
        from shared_model.training.evaluate import evaluate_model

        dataset = self.eval_set if dataset is None else dataset
        if dataset is None:
            return None
        set_exchanged_state(self.model, state)
        fed = self.settings.federation
        agg = evaluate_model(self.model, dataset, device=fed.device, batch_size=fed.eval_batch_size).aggregate
        return {k: float(agg[k]) for k in GLOBAL_METRICS}

    def test_report(self, state: "OrderedDict[str, torch.Tensor]") -> dict[str, Any]:
        """Dice/IoU/HD95 of ``state`` on the pooled test split and on each centre's part of it, at
        each mask's own resolution (HD95 in image pixels)."""
        from shared_model.training.evaluate import evaluate_model

        set_exchanged_state(self.model, state)
        fed = self.settings.federation
        result = evaluate_model(self.model, self.test_set, device=fed.device, batch_size=fed.eval_batch_size,
                                resolution="original")
        keys = ("dice", "iou", "hd95", "n")
        return {
            "eval_prompt": self.settings.data.eval_prompt,
            "test_resolution": "original",
            "best_round_test": {k: float(result.aggregate[k]) for k in keys},
            "best_round_test_by_centre": {
                centre: {k: float(agg[k]) for k in keys} for centre, agg in result.by_centre().items()
            },
            "constant_mask_baseline": self.test_baseline(keys),
        }

    def test_baseline(self, keys: tuple[str, ...] = ("dice", "iou", "hd95", "n")) -> dict[str, Any]:
        """The constant-mask baseline of the test report: the mean mask of the pooled *training*
        split (the complement of the test split; never the test masks), thresholded at the
        threshold best on that training split, scored on the test split overall and per centre."""
        from shared_model.training.evaluate import fit_constant_mask, score_constant_mask

        train = _dataset(self.settings, pooled_splits(self.settings.data)["train"])
        fit = fit_constant_mask(train)
        scored = score_constant_mask(fit["mask"], self.test_set, resolution="original")
        return {
            "fitted_on": f"pooled training split ({fit['train_images']} images)",
            "threshold": float(fit["threshold"]),
            "pooled": {k: float(scored.aggregate[k]) for k in keys},
            "by_centre": {c: {k: float(agg[k]) for k in keys} for c, agg in scored.by_centre().items()},
        }

    def _save_model(self, name: str, state: "OrderedDict[str, torch.Tensor]", extra: dict[str, Any]) -> None:
        from shared_model.checkpoint import save_model_checkpoint

        set_exchanged_state(self.model, state)
        if self.settings.adapter.enabled:  # an adapter run's state is a task adapter (+ the base it needs)
            from server.adapter import save_run_adapter

            save_run_adapter(self.run_dir, name, self.model, self.settings, extra)
            return
        save_model_checkpoint(self.run_dir / name, self.model, extra)

    # -- the loop ----------------------------------------------------------------------------

    def _start(self) -> tuple[ServerCheckpoint, int]:
        path = self.run_dir / CHECKPOINT_NAME
        if self.settings.federation.resume:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, self.settings.model, path)
            check_state(ckpt.state, self.shapes)
            self.strategy.load_state_dict(ckpt.strategy)
            self.metrics.rewrite(ckpt.history)
            self.audit.rewrite([r for r in self.audit.read() if r["round"] <= ckpt.round])
            (self.run_dir / RUN_CONFIG_NAME).write_text(json.dumps(self.run_config, indent=2, default=str))
            log.info("resuming after round %d from %s", ckpt.round, path)
            return ckpt, ckpt.round + 1
        if path.exists():
            raise ResumeError(f"{path} exists: set resume=true to continue that run, or use a new run-dir")
        (self.run_dir / RUN_CONFIG_NAME).write_text(json.dumps(self.run_config, indent=2, default=str))
        state = get_exchanged_state(self.model)
        ckpt = ServerCheckpoint(round=0, state=dict(state), model_config=self._model_dict(),
                                run_config=self.run_config)
        metrics = self.evaluate(state)
        if metrics is not None:
            ckpt.history.append({"round": 0, "kind": "global", **metrics})
            ckpt.best_round, ckpt.best_dice, ckpt.best_state = 0, metrics["dice"], dict(state)
        self.metrics.rewrite(ckpt.history)
        self.audit.rewrite([])
        save_checkpoint(path, ckpt)
        return ckpt, 1

    def _model_dict(self) -> dict[str, Any]:
        from shared_model.config import to_dict

        return to_dict(self.settings.model)

    def run_round(self, grid: Grid, rnd: int, state: "OrderedDict[str, torch.Tensor]"):
        """One round; returns the new global state and the round's metrics rows."""
        fed = self.settings.federation
        start = time.perf_counter()
        random.seed(client_seed(fed.seed, rnd, -1))
        messages: list = []
        secagg = None
        if self.settings.privacy.secagg:
            state, train_rows, train_agg, secagg = self._train_secagg(grid, rnd, state)
        else:
            arrays = state_to_record(state, "float32")
            messages = list(self.strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
            train = send_and_collect(grid, messages, fed.reply_timeout)
            new_arrays, train_agg = self.strategy.aggregate_train(rnd, train.replies)
            self.strategy.record_unreplied(rnd, train.unreplied, "train")
            if new_arrays is not None:
                state = record_to_state(new_arrays)
            train_rows = [{"round": rnd, "kind": "train", "hospital": self._name(r), **r}
                          for r in self.strategy.train_records]
        eval_messages = list(self.strategy.configure_evaluate(rnd, state_to_record(state, "float32"),
                                                              ConfigRecord(), grid))
        eval_agg = None
        self.strategy.eval_records = []
        if eval_messages:
            evaluated = send_and_collect(grid, eval_messages, fed.reply_timeout)
            eval_agg = self.strategy.aggregate_evaluate(rnd, evaluated.replies)
            self.strategy.record_unreplied(rnd, evaluated.unreplied, "evaluate")
        eval_rows = [{"round": rnd, "kind": "evaluate", "hospital": self._name(r), **r}
                     for r in self.strategy.eval_records]
        metrics = self.evaluate(state)
        accepted = [r for r in train_rows if r["accepted"]]
        round_row = {
            "round": rnd,
            "kind": "round",
            "seconds": time.perf_counter() - start,
            "accepted": len(accepted),
            "dropped": len(train_rows) - len(accepted),
            "sampled": len(train_rows),
            "min-nodes": fed.min_nodes,
            "status": "secagg" if secagg else self.strategy.round_status,
            **{f"dropped-{kind}": sum(1 for r in train_rows if r.get("drop") == kind) for kind in DROP_KINDS},
            "bytes-up": secagg["bytes-up"] if secagg else sum(r["bytes-up"] for r in accepted),
            "bytes-down": self.strategy.bytes_down * (len(messages) + len(eval_messages))
            + (secagg["bytes-down"] if secagg else 0),
            "train-loss": float(train_agg["train-loss"]) if train_agg is not None else None,
            "dice": float(eval_agg["dice"]) if eval_agg is not None and "dice" in eval_agg else None,
            **round_privacy(self.strategy.inner, train_rows),
        }
        if secagg:
            round_row["secagg-seconds"] = secagg["seconds"]
        global_rows = [{"round": rnd, "kind": "global", **metrics}] if metrics is not None else []
        return state, train_rows + eval_rows + global_rows + [round_row]

    def _train_secagg(self, grid: Grid, rnd: int, state: "OrderedDict[str, torch.Tensor]"):
        """Training phase with SecAgg+: the server only learns the weighted average of the deltas."""
        from server.secagg import secagg_train_round

        fed = self.settings.federation
        mu = fed.proximal_mu if fed.strategy == "fedprox" else 0.0
        delta, info = secagg_train_round(grid, self.settings, rnd, state, mu)
        if delta is not None:
            state = OrderedDict((k, v + fed.server_lr * delta[k]) for k, v in state.items())
        rows = [{"round": rnd, "kind": "train", "hospital": self._name(r), **r} for r in info["records"]]
        done = [r for r in rows if r["accepted"] and math.isfinite(r.get("train-loss", math.nan))]
        weight = sum(r["num-examples"] for r in done)
        loss = sum(r["num-examples"] * r["train-loss"] for r in done) / weight if weight else math.nan
        return state, rows, {"train-loss": loss}, info

    def run(self, grid: Grid) -> Path:
        """Run (or resume) all rounds; write the final report and return its path."""
        fed = self.settings.federation
        ckpt, first = self._start()
        state = OrderedDict(ckpt.state)
        for rnd in range(first, fed.num_server_rounds + 1):
            try:
                state, rows = self.run_round(grid, rnd, state)
            except PrivacyBudgetExhausted as err:
                log.warning("round %d not run: %s; stopping", rnd, err)
                break
            self.metrics.append(rows)
            self.audit.append(self.strategy.audit)
            ckpt.history.extend(rows)
            score = _round_score(rows)
            if score is not None and score > ckpt.best_dice:
                ckpt.best_round, ckpt.best_dice, ckpt.best_state = rnd, score, dict(state)
                self._save_model("best_model.pt", state, {"round": rnd, "dice": score})
            ckpt.round, ckpt.state, ckpt.strategy = rnd, dict(state), self.strategy.state_dict()
            save_checkpoint(self.run_dir / CHECKPOINT_NAME, ckpt)
            if fed.keep_round_checkpoints:
                save_checkpoint(self.run_dir / "checkpoints" / f"round-{rnd:03d}.pt", ckpt)
            done = rows[-1]
            log.info("round %d/%d: global Dice %s, federated Dice %s, %d accepted / %d dropped%s, %.1f s",
                     rnd, fed.num_server_rounds, _fmt(next((r["dice"] for r in rows if r["kind"] == "global"), None)),
                     _fmt(done["dice"]), done["accepted"], done["dropped"], _drops(done), done["seconds"])
            train = [r for r in rows if r["kind"] == "train"]
            if train and all(declined(r) for r in train):
                log.warning("every hospital declined round %d (local DP budgets spent); stopping", rnd)
                break
        return self.finish(ckpt)

    def finish(self, ckpt: ServerCheckpoint) -> Path:
        """Save the final/best models, evaluate the best state on the test split, write the report."""
        state = OrderedDict(ckpt.state)
        self._save_model("final_model.pt", state, {"round": ckpt.round})
        if ckpt.best_round >= 0:
            self._save_model("best_model.pt", OrderedDict(ckpt.best_state),
                             {"round": ckpt.best_round, "dice": ckpt.best_dice})
        extra: dict[str, Any] = {"best_dice": ckpt.best_dice if ckpt.best_round >= 0 else None}
        if ckpt.best_round >= 0 and self.test_set is not None:
            extra.update(self.test_report(OrderedDict(ckpt.best_state)))
        extra["privacy"] = privacy_summary(self.settings, ckpt.history, self.strategy.inner)
        overlays, source = self._overlays(ckpt)
        report, html = write_reports(self.run_dir, ckpt.history, ckpt.best_round, extra, self.run_config,
                                     overlays, overlay_source=source)
        log.info("report: %s and %s", report, html)
        return report

    def _overlays(self, ckpt: ServerCheckpoint) -> tuple[list[dict[str, Any]] | None, str]:
        """Prediction overlays of the best (else final) state on the test split (else the
        evaluation set; none without server-side evaluation data), and where they come from."""
        from server.html_report import OVERLAY_EXAMPLES, overlay_examples

        dataset = self.test_set if self.test_set is not None else self.eval_set
        overlays, source = None, ""
        if dataset is not None:
            best = ckpt.best_round >= 0
            set_exchanged_state(self.model, OrderedDict(ckpt.best_state if best else ckpt.state))
            overlays = overlay_examples(self.model, dataset, OVERLAY_EXAMPLES, device=self.settings.federation.device)
            source = (f"{'Best' if best else 'Final'} state (round {ckpt.best_round if best else ckpt.round}) on "
                      f"{len(overlays)} of the {len(dataset)} images of the "
                      f"{'test split' if self.test_set is not None else 'evaluation set'}.")
        return overlays, source


def _dataset(settings: RunSettings, samples: list, image_size: int | None = None):
    """A scored set: not augmented, prompted per ``data.eval_prompt`` (class prompt by default)."""
    from shared_model.data.dataset import evaluation_dataset

    data = settings.data
    return evaluation_dataset(samples, image_size or settings.model.sam.image_size, data.eval_prompt,
                              data.class_name, data.on_error, resize=settings.model.sam.input_resize)


def pooled_splits(data: DataConfig) -> dict[str, list]:
    """The pooled train/val/test samples of a data config (its split file, else its fractions and seed)."""
    from shared_model.data.sources import list_config_samples
    from shared_model.data.splits import load_split_file, split_samples

    samples, _ = list_config_samples(data)
    if data.split_file:
        return load_split_file(data.split_file, samples)
    return split_samples(samples, data.val_fraction, data.test_fraction, data.split_seed)


def evaluation_sets(settings: RunSettings, image_size: int | None = None):
    """The server's evaluation set (``global-eval``) and, when that is ``val``, the pooled test set.

    Args:
        settings: The run's settings (``global-eval`` and the data config).
        image_size: Input size of the datasets (default: the model config's).

    Returns:
        ``(eval_set, test_set)``; either may be None (``global-eval = none``; no test split).

    Raises:
        ConfigError: On an empty split or a ``global-eval`` that is no choice nor a folder.
        DataError: When the data cannot be read.
    """
    from shared_model.data.folder import list_samples
    from shared_model.data.sources import config_task

    choice, data = settings.federation.global_eval, settings.data
    if choice == "none":
        return None, None
    if choice in ("val", "test"):
        splits = pooled_splits(data)
        if not splits[choice]:
            raise ConfigError(f"global-eval: the pooled {choice} split of {data.root} is empty")
        test = _dataset(settings, splits["test"], image_size) if choice == "val" and splits["test"] else None
        return _dataset(settings, splits[choice], image_size), test
    path = Path(choice)
    if not path.is_dir():
        raise ConfigError(f"global-eval: {choice!r} is neither 'val', 'test', 'none' nor a folder")
    # A root of centres or one centre's folder, holding images of the config's task.
    samples, _ = list_samples(path, None, data.on_error, config_task(data))
    return _dataset(settings, samples, image_size), None


def _drops(round_row: dict[str, Any]) -> str:
    """`` (2 timeout, 1 error)``: the round's dropped replies by kind, or "" when none was dropped."""
    parts = [f"{round_row[f'dropped-{k}']} {k}" for k in DROP_KINDS if round_row.get(f"dropped-{k}")]
    return f" ({', '.join(parts)})" if parts else ""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _round_score(rows: list[dict[str, Any]]) -> float | None:
    """Global Dice of the round, else the federated evaluation Dice, else None."""
    for kind in ("global", "round"):
        for row in rows:
            if row["kind"] == kind and row.get("dice") is not None:
                return float(row["dice"])
    return None
