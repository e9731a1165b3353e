"""Preparing an experiment's run folder: synthetic data, the split file, a partition check."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from shared_model.config import ConfigError
from shared_model.config.experiment import PROJECT_ROOT, load_experiment  # noqa: F401 - PROJECT_ROOT re-exported

DEFAULT_CONFIG = PROJECT_ROOT / "simulation" / "configs" / "demo.yaml"


def prepare_run(config_path: str | Path, overrides: Mapping[str, Any] | None = None,
                run_dir: str | Path | None = None, resume: bool = False):
    """Parse the experiment and prepare its run folder (data, split check).

    Returns:
        ``(experiment, run_dir)`` with ``experiment.federation.run_dir`` / ``resume`` set.
    """
    from shared_model.data.partition import hospital_splits

    exp = load_experiment(config_path, overrides)
    if run_dir is None and exp.federation.run_dir:
        run_dir = exp.federation.run_dir
    if run_dir is None:
        run_dir = Path.cwd() / "runs" / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run_dir).resolve()
    if resume and not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"--resume: {run_dir} holds no checkpoint.pt")
    run_dir.mkdir(parents=True, exist_ok=True)
    if exp.synthetic is not None:
        from shared_model.data.synthetic import generate_dataset

        syn = exp.synthetic
        data_root = run_dir / "data"
        if not data_root.is_dir():
            generate_dataset(data_root, centres=syn.centres, per_centre=syn.per_centre,
                             image_size=syn.image_size, seed=syn.seed)
        exp.data.root = str(data_root)
    if exp.data.split_file and not Path(exp.data.split_file).exists():
        from shared_model.data.splits import build_splits

        build_splits(exp.data)  # writes the split file once, before any client reads it
    hospital_splits(exp.data, exp.partition, exp.simulation.num_supernodes)  # fail early, naming the setting
    exp.federation.run_dir = str(run_dir)
    exp.federation.resume = resume
    (run_dir / "experiment.json").write_text(json.dumps(exp.raw, indent=2, sort_keys=True, default=str))
    return exp, run_dir
