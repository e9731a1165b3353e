"""``promptsam experiment``: centralized vs local vs FedAvg vs FedProx, same compute, tables and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from shared_model.config import ConfigError
from simulation import compare_jobs, comparison
from simulation.comparison import CompareConfig, load_comparison, plan, run_comparison
from simulation.comparison_report import table_rows

SYNTHETIC = {
    "name": "cmp_test",
    "model": {"preset": "tiny"},
    "federation": {"fraction_evaluate": 0.0, "global_eval": "val", "device": "cpu", "eval_batch_size": 8},
    "train": {"batch_size": 2, "lr": 0.003, "warmup_steps": 0, "amp": False},
    "data": {"val_fraction": 0.2, "test_fraction": 0.3, "augment": False},
    "synthetic": {"centres": 3, "per_centre": 8, "image_size": 128},
    "partition": {"mode": "centre"},
    "simulation": {"num_supernodes": 3},
    "compare": {"total_steps": 6, "rounds": 2, "prompt_styles": True, "prompt_model": "fedavg"},
}


def _write(tmp_path: Path, data: dict, name: str = "cmp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_comparison_runs_every_method_with_the_same_compute_and_resumes(tmp_path, monkeypatch):
    config = _write(tmp_path, SYNTHETIC)
    out = tmp_path / "out"
    results = run_comparison(config, out, echo=lambda line: None)
    jobs = results["jobs"]
    # 4 methods on all centres (local = one job per centre) + 3 methods x 3 held-out centres.
    assert len(jobs) == 6 + 9
    steps = {key: job["steps"] for key, job in jobs.items() if key.startswith("all/")}
    assert steps == {"all/centralized/seed-0": 6, "all/fedavg/seed-0": 6, "all/fedprox/seed-0": 6,
                     **{f"all/local-centre_{i}/seed-0": 2 for i in range(3)}}
    assert jobs["all/fedavg/seed-0"]["local_steps"] == 1
    assert jobs["loo-centre_0/fedavg/seed-0"]["centres"] == ["centre_1", "centre_2"]
    assert jobs["loo-centre_0/fedavg/seed-0"]["local_steps"] == 1 and jobs["loo-centre_0/fedavg/seed-0"]["steps"] == 4
    # Held-out jobs are tested only on the held-out centre; the others on every centre.
    assert {r["centre"] for r in jobs["loo-centre_1/centralized/seed-0"]["per_image"]} == {"centre_1"}
    assert {r["centre"] for r in jobs["all/local-centre_2/seed-0"]["per_image"]} == {"centre_0", "centre_1", "centre_2"}
    assert set(results["prompt_styles"]["styles"]) >= {"class-name", "attribute-caption", "wrong-organ"}

    table = (out / "table.md").read_text()
    for name in ("centralized", "local (centre_0)", "local (own centre)", "fedavg", "fedprox",
                 "held out: centre_2", "wrong-organ"):
        assert name in table
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    main = [r for r in rows if r["setting"] == "all"]
    assert len(main) == (3 + 3 + 1) * 4  # (centralized, fedavg, fedprox, 3 local, local own) x (3 centres + pooled)
    assert len([r for r in rows if r["setting"] == "leave-one-out"]) == 3 * 3
    assert all(0.0 <= float(r["dice"]) <= 1.0 and int(r["n"]) > 0 for r in rows)
    for name in ("dice_by_centre.png", "dice_leave_one_out.png", "federated_rounds.png"):
        assert (out / name).stat().st_size > 1000
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["compare"]["seeds"] == [0] and recorded["data"]["centres"] == ["centre_0", "centre_1", "centre_2"]
    assert results["environment"]["torch"]

    # Resuming retrains nothing and gives the same table.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished job was trained again")

    monkeypatch.setattr(comparison, "train_single_site", refuse)
    monkeypatch.setattr(comparison, "train_federated", refuse)
    run_comparison(config, out, echo=lambda line: None)
    assert (out / "table.md").read_text() == table
    # The same folder with another configuration is refused.
    other = _write(tmp_path, {**SYNTHETIC, "compare": {**SYNTHETIC["compare"], "total_steps": 12}}, "other.yaml")
    with pytest.raises(ConfigError, match="another configuration"):
        run_comparison(other, out, echo=lambda line: None)


def test_personalised_fedavg_fine_tunes_the_global_model_at_each_hospital_within_the_same_compute(tmp_path,
                                                                                                   monkeypatch):
    import torch

    from shared_model.checkpoint import load_model_checkpoint

    config = _write(tmp_path, {**SYNTHETIC, "compare": {
        "methods": ["local", "fedavg_ft"], "total_steps": 9, "rounds": 1, "finetune_steps": 1,
        "finetune_lr": 0.01, "leave_one_out": False, "prompt_styles": False}})
    out = tmp_path / "out"
    results = run_comparison(config, out, echo=lambda line: None)
    job = results["jobs"]["all/fedavg_ft/seed-0"]
    # 9 steps in all: 1 round x 2 local steps x 3 hospitals, then 1 fine-tuning step at each hospital.
    assert job["steps"] == 9 and job["local_steps"] == 2 and job["finetune_steps"] == 1 and job["finetune_lr"] == 0.01
    assert results["jobs"]["all/local-centre_0/seed-0"]["steps"] == 3
    # Each hospital's own model, tested on its own test images only, next to its own constant mask.
    by_centre = {c: {r["stem"] for r in job["per_image"] if r["centre"] == c} for c in ("centre_0", "centre_1", "centre_2")}
    local = results["jobs"]["all/local-centre_0/seed-0"]["per_image"]
    assert by_centre["centre_0"] == {r["stem"] for r in local if r["centre"] == "centre_0"}
    assert all(by_centre.values()) and len(job["per_image"]) == sum(map(len, by_centre.values()))
    assert [r["stem"] for r in job["baseline_per_image"]] == [r["stem"] for r in job["per_image"]]
    global_model, _ = load_model_checkpoint(job["federated_checkpoint"])
    tuned = {c: load_model_checkpoint(path)[0] for c, path in job["checkpoints"].items()}
    assert set(tuned) == {"centre_0", "centre_1", "centre_2"}
    for model in tuned.values():  # fine-tuned away from the global model, each at its own hospital
        moved = [not torch.equal(p, q) for (_, p), (_, q) in zip(model.named_parameters(), global_model.named_parameters())
                 if p.requires_grad]
        assert any(moved)
    a, b = (dict(m.named_parameters()) for m in (tuned["centre_0"], tuned["centre_1"]))
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].requires_grad)
    table = (out / "table.md").read_text()
    assert "| fedavg + local fine-tune (own centre) |" in table and "then 1 steps at 0.01" not in table
    assert "FedAvg 1 rounds x 2 local steps x 3 hospitals, then 1 steps at peak learning rate 0.01" in table

    # Another fine-tuning of the same federated run fine-tunes its final model again, not the run.
    results_path = out / "results.json"
    kept = json.loads(results_path.read_text())
    del kept["jobs"]["all/fedavg_ft/seed-0"]
    results_path.write_text(json.dumps(kept))
    (out / "config.yaml").unlink()
    config_lr = _write(tmp_path, {**SYNTHETIC, "compare": {
        "methods": ["local", "fedavg_ft"], "total_steps": 9, "rounds": 1, "finetune_steps": 1,
        "finetune_lr": 0.001, "leave_one_out": False, "prompt_styles": False}}, "lr.yaml")
    import server.loop

    def refuse(*args, **kwargs):
        raise AssertionError("the finished federated run was trained again")

    monkeypatch.setattr(server.loop, "FederatedServer", refuse)
    again = run_comparison(config_lr, out, echo=lambda line: None)["jobs"]["all/fedavg_ft/seed-0"]
    assert again["finetune_lr"] == 0.001 and again["federated_checkpoint"] == job["federated_checkpoint"]
    assert again["global_val_dice_by_round"] == job["global_val_dice_by_round"]
    run_config = json.loads((Path(job["federated_checkpoint"]).parent / "run_config.json").read_text())
    assert compare_jobs.finished_run_seconds(Path(job["federated_checkpoint"]).parent, run_config) is not None
    assert compare_jobs.finished_run_seconds(Path(job["federated_checkpoint"]).parent,
                                           {**run_config, "local-steps": 3}) is None
    assert "then 1 steps at peak learning rate 0.001" in (out / "table.md").read_text()


def test_table_rows_pool_images_and_pick_each_centres_own_local_model():
    def job(setting, method, centres, per_image, seed=0):
        return {"setting": setting, "method": method, "centres": centres, "seed": seed, "steps": 10,
                "per_image": [{"centre": c, "stem": f"{c}{i}", "dice": d, "iou": d / 2, "hd95": 10 * d}
                              for i, (c, d) in enumerate(per_image)]}

    results = {"jobs": {
        "a": job("all", "fedavg", ["x", "y"], [("x", 0.2), ("x", 0.4), ("y", 0.9)]),
        "b": job("all", "fedavg", ["x", "y"], [("x", 0.6), ("y", 0.7)], seed=1),
        "c": job("all", "local", ["x"], [("x", 0.5), ("y", 0.1)]),
        "d": job("all", "local", ["y"], [("x", 0.3), ("y", 0.8)]),
        "e": job("loo-y", "fedavg", ["x"], [("y", 0.25), ("y", 0.75)]),
    }}
    rows = table_rows(results, ["x", "y"], ["fedavg", "local"])
    get = {(r["setting"], r["method"], r["test_centre"]): r for r in rows}
    fx = get[("all", "fedavg", "x")]  # seeds pooled: 0.2, 0.4, 0.6
    assert fx["n"] == 3 and fx["dice"] == pytest.approx(0.4) and fx["dice_std"] == pytest.approx((0.08 / 3) ** 0.5)
    assert fx["seeds"] == [0, 1] and fx["iou"] == pytest.approx(0.2)
    assert get[("all", "fedavg", "pooled")]["n"] == 5
    own = get[("all", "local (own centre)", "pooled")]  # x by x's model (0.5), y by y's model (0.8)
    assert own["n"] == 2 and own["dice"] == pytest.approx(0.65)
    assert get[("all", "local (x)", "y")]["dice"] == pytest.approx(0.1)
    loo = get[("leave-one-out", "fedavg", "y")]
    assert loo["trained_on"] == "x" and loo["dice"] == pytest.approx(0.5) and loo["hd95"] == pytest.approx(5.0)
    assert ("leave-one-out", "fedavg", "pooled") not in get


def test_constant_mask_baseline_rows_per_centre_from_each_jobs_own_training_split(synthetic_root, monkeypatch):
    from types import SimpleNamespace

    from shared_model.config import DataConfig, PartitionConfig
    from shared_model.training import evaluate
    from simulation.compare_jobs import comparison_dataset as _dataset, constant_baseline
    from simulation.comparison_report import markdown

    exp = SimpleNamespace(data=DataConfig(root=str(synthetic_root), val_fraction=0.25, test_fraction=0.25),
                          partition=PartitionConfig(), model={"preset": "tiny"})
    fitted: list[set[str]] = []
    original = evaluate.fit_constant_mask
    monkeypatch.setattr(evaluate, "fit_constant_mask",
                        lambda train, *a: (fitted.append({s.stem for s in train.samples}), original(train, *a))[1])
    base = constant_baseline(exp, ["centre_0"], ["centre_0", "centre_1"])
    train = {s.stem for s in _dataset(exp, ["centre_0"], "train").samples}
    tests = {s.stem for s in _dataset(exp, ["centre_0", "centre_1"], "test").samples}
    assert fitted == [train] and not train & tests  # the job's own training split, never a test mask
    assert {r["stem"] for r in base["baseline_per_image"]} == tests
    assert base["baseline_fit"]["train_centres"] == ["centre_0"] and base["baseline_fit"]["train_images"] == len(train)

    def job(setting, method, centres, per_image, baseline):
        rows = [{"centre": c, "stem": f"{c}{i}", "dice": d, "iou": d / 2, "hd95": 10 * d}
                for i, (c, d) in enumerate(per_image)]
        return {"setting": setting, "method": method, "centres": centres, "seed": 0, "steps": 10,
                "eval_prompt": "class", "per_image": rows,
                "baseline_per_image": [{**r, "dice": b, "iou": b / 2, "hd95": 10 * b} for r, b in zip(rows, baseline)]}

    results = {"jobs": {
        "a": job("all", "fedavg", ["x", "y"], [("x", 0.6), ("y", 0.8)], [0.2, 0.4]),
        "c": job("all", "local", ["x"], [("x", 0.5), ("y", 0.1)], [0.3, 0.05]),
        "d": job("all", "local", ["y"], [("x", 0.3), ("y", 0.8)], [0.1, 0.35]),
        "e": job("loo-y", "fedavg", ["x"], [("y", 0.7)], [0.15]),
    }}
    rows = table_rows(results, ["x", "y"], ["fedavg", "local"])
    get = {(r["setting"], r["method"], r["test_centre"]): r for r in rows}
    assert get[("all", "fedavg", "x")]["baseline_dice"] == pytest.approx(0.2)
    assert get[("all", "fedavg", "y")]["baseline_dice"] == pytest.approx(0.4)
    assert get[("all", "fedavg", "pooled")]["baseline_dice"] == pytest.approx(0.3)
    assert get[("all", "local (x)", "y")]["baseline_dice"] == pytest.approx(0.05)  # x's own training masks
    assert get[("all", "local (own centre)", "y")]["baseline_dice"] == pytest.approx(0.35)
    assert get[("leave-one-out", "fedavg", "y")]["baseline_dice"] == pytest.approx(0.15)
    cfg = SimpleNamespace(total_steps=20, rounds=2, methods=["fedavg", "local"], seeds=[0], proximal_mu=0.0)
    lines = markdown(results, rows, ["x", "y"], cfg, 2).splitlines()
    assert "Evaluation prompt: class (the class name only; no ground truth in the prompt)" in "\n".join(lines)
    dice = lines[lines.index("## Trained on all centres: Dice") + 2:]
    assert "| constant mask (mean train mask of all centres) | 0.200 ± 0.000 | 0.400 ± 0.000 | 0.300 ± 0.100 |" in dice
    assert "| constant mask (mean train mask of x) | 0.300 ± 0.000 | 0.050 ± 0.000 | 0.175 ± 0.125 |" in dice
    assert any(line.startswith("| constant mask (mean train mask of the other centres) | - | 0.150") for line in lines)


def test_plan_orders_jobs_and_skips_leave_one_out_when_off():
    jobs = plan(CompareConfig(methods=["local", "fedavg"], leave_one_out_methods=["fedavg"], seeds=[0, 1]),
                ["a", "b", "c"])
    assert [j.key for j in jobs[:4]] == ["all/local-a/seed-0", "all/local-b/seed-0", "all/local-c/seed-0",
                                         "all/fedavg/seed-0"]
    assert [j.key for j in jobs[4:7]] == ["loo-a/fedavg/seed-0", "loo-b/fedavg/seed-0", "loo-c/fedavg/seed-0"]
    assert len(jobs) == 14
    assert len(plan(CompareConfig(leave_one_out=False), ["a", "b"])) == 5


@pytest.mark.parametrize("compare, message", [
    ({"methods": ["fedavg", "swarm"]}, "compare.methods: unknown method"),
    ({"leave_one_out_methods": ["local"]}, "compare.leave_one_out_methods"),
    ({"prompt_model": "local", "methods": ["local", "fedavg"]}, "compare.prompt_model"),
    ({"total_steps": 5, "rounds": 2}, "compare.total_steps"),
    ({"seeds": []}, "compare.seeds"),
    ({"total_step": 5}, "total_step"),
    ({"methods": ["fedavg_ft"], "prompt_styles": False, "finetune_steps": 2, "total_steps": 11}, "compare.finetune_steps"),
    ({"methods": ["fedavg_ft"], "prompt_styles": False, "finetune_lr": 0.0, "total_steps": 600}, "compare.finetune_lr"),
    ({"leave_one_out_methods": ["fedavg_ft"]}, "compare.leave_one_out_methods: 'fedavg_ft'"),
    ({"methods": ["fedavg_ft"], "prompt_model": "fedavg_ft", "total_steps": 600}, "compare.prompt_model"),
])
def test_bad_compare_sections_name_the_field(tmp_path, compare, message):
    with pytest.raises(ConfigError, match=message):
        load_comparison(_write(tmp_path, {**SYNTHETIC, "compare": {**SYNTHETIC["compare"], **compare}}))


def test_a_bad_override_names_the_set_flag(tmp_path):
    with pytest.raises(ConfigError, match="^--set compare.rounds=0: compare.rounds: must be >= 1$"):
        load_comparison(_write(tmp_path, SYNTHETIC), {"compare.rounds": "0"})
    with pytest.raises(ConfigError, match="^--set train.batch_size=0: train.batch_size: must be >= 1$"):
        load_comparison(_write(tmp_path, SYNTHETIC), {"train.batch_size": "0"})


def test_the_comparison_needs_one_hospital_per_centre(tmp_path):
    with pytest.raises(ConfigError, match="partition.mode"):
        load_comparison(_write(tmp_path, {**SYNTHETIC, "partition": {"mode": "iid"}}))


def test_the_shipped_real_data_config_parses():
    root = Path(__file__).resolve().parents[2]
    exp, cfg, raw = load_comparison(root / "simulation" / "configs" / "compare_polyp_tiny.yaml")
    assert cfg.methods == ["centralized", "local", "fedavg"] and not cfg.leave_one_out
    assert raw["model"]["foundation"] == "tiny"  # adapted from the committed foundation
    assert Path(raw["data"]["root"]).is_absolute() and exp.data.centres == ["kvasir_seg", "cvc_clinicdb", "cvc_colondb"]
    json.dumps(raw)


def test_the_shipped_multitask_config_parses_and_restricts_to_one_task():
    root = Path(__file__).resolve().parents[2]
    config = root / "simulation" / "configs" / "multitask_tiny.yaml"
    exp, cfg, raw = load_comparison(config)
    assert cfg.methods == ["centralized"] and len(cfg.seeds) >= 2
    assert [s.task for s in exp.data.sources] == ["polyp", "breast-tumour", "retinal-vessels"]
    exp, _, _ = load_comparison(config, {"data.centres": "[busi]"})
    assert exp.data.centres == ["busi"]
