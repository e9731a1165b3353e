"""bench scale's pieces that need no simulation: the overrides of a point, round summaries, the
process-tree probe, the figure."""

import json
import os
import subprocess
import sys

import pytest

from shared_model.benchmarks.procmem import ProcessTreeProbe, descendants
from simulation.bench_scale import REAL, SYNTHETIC, plot_scale, round_rows, scale_overrides, summarise_rounds


def test_a_point_samples_exactly_k_hospitals_without_evaluation_or_faults():
    from shared_model.config.experiment import load_experiment

    for config in (REAL, SYNTHETIC):
        exp = load_experiment(config, scale_overrides(100, 20, 3, 1))
        assert exp.simulation.num_supernodes == 100
        fed = exp.federation
        assert max(int(100 * fed.fraction_train), fed.min_nodes) == 20  # Flower's sample size
        assert fed.fraction_evaluate == 0.0 and fed.global_eval == "none" and not exp.faults.enabled
    with pytest.raises(ValueError, match="--sampled: 120 is not between 1 and the 100 hospitals"):
        scale_overrides(100, 120, 3, 1)


def test_round_summary_times_rounds_from_the_second_on(tmp_path):
    rows = [{"round": i, "kind": "round", "seconds": s, "accepted": 10, "dropped": 0}
            for i, s in ((1, 40.0), (2, 6.0), (3, 4.0), (4, 5.0))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows + [{"kind": "train"}]))
    summary = summarise_rounds(round_rows(tmp_path))
    assert summary["round_seconds"] == [40.0, 6.0, 4.0, 5.0]
    assert summary["timed_rounds"]["median"] == 5.0 and summary["rounds_per_minute"] == 12.0
    assert round_rows(tmp_path / "missing") == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_probe_sums_the_tree_and_tracks_marked_processes():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)",
                              "marker-for-probe"])
    try:
        assert child.pid in descendants(os.getpid())
        import time

        probe = ProcessTreeProbe([child.pid], track="marker-for-probe")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and probe.tracked_peak_mib.get(child.pid, 0.0) < 64:
            probe.sample()
            time.sleep(0.1)
        summary = probe.summary()
        assert summary["tracked_processes"] == 1 and summary["tracked_peak_rss_max_mib"] >= 64
        assert summary["peak_pss_all_processes_mib"] >= 60 and len(summary["pss_timeline_mib"]) == probe.samples
    finally:
        child.kill()
        child.wait()


def test_figure_is_written(tmp_path):
    point = {"sampled": 10, "hospitals": 100, "client_cpus": 1, "rounds_per_minute": 10.0,
             "timed_rounds": {"median": 6.0, "min": 5.0, "max": 7.0}}
    result = {"config": "simulation/configs/hospitals100_tiny.yaml", "local_steps": 1,
              "points": [point, {**point, "sampled": 20, "timed_rounds": {"median": 11.0, "min": 10.0, "max": 12.0}}]}
    path = plot_scale(result, tmp_path / "scale.png")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="no point has a timed round"):
        plot_scale({**result, "points": [{"sampled": 10}]}, tmp_path / "none.png")
