"""``promptsam text-selection``: end to end on a few scenes (a random-init tiny checkpoint, the packaged
tiny foundation) and its one-line errors naming the flag."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cli.main import main
from shared_model.checkpoint import save_model_checkpoint
from shared_model.config import get_preset
from shared_model.data.scene_dataset import generate_scenes, scene_items
from shared_model.modeling.prompt_sam import build_model
from shared_model.pretrain.selection import DEFAULT_SCENE_SEED


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    return save_model_checkpoint(tmp_path_factory.mktemp("ts") / "model.pt", build_model("tiny"))


def _check_report(path, scenes: int, source: str):
    report = json.loads(path.read_text())
    expected = scene_items(generate_scenes(scenes, 128, DEFAULT_SCENE_SEED))
    assert report["model"]["source"] == source and report["scene_seed"] == DEFAULT_SCENE_SEED
    assert report["prompts"] == len(expected) == len(report["items"])
    summary = report["summary"]
    assert sum(summary[g]["n"] for g in ("kind", "attribute") if g in summary) == len(expected)
    for s in summary.values():
        assert 0.0 <= s["named"] <= 1.0 and 0.0 <= s["other"] <= 1.0
        assert s["difference"] == pytest.approx(s["named"] - s["other"])
    return report


def test_runs_on_a_random_init_checkpoint(random_checkpoint, tmp_path, capsys, one_thread):
    out = tmp_path / "sel.json"
    assert main(["text-selection", "--checkpoint", str(random_checkpoint), "--scenes", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| prompts | n | Dice named | Dice other (best) |" in printed and "| kind |" in printed
    report = _check_report(out, 2, "checkpoint")
    assert report["model"]["prompt_paths"]["boxes"] == "saliency"  # the tiny preset's paths, as configured
    sim = report["model"]["text_similarity"]
    n = len(sim["texts"])
    assert sim["texts"][:2] == ["the polyp", "the instrument"] and "text embeddings (cosine similarity" in printed
    assert all(sim["cosine"][i][i] == pytest.approx(1.0, abs=1e-3) for i in range(n))
    assert all(sim["cosine"][i][j] == pytest.approx(sim["cosine"][j][i], abs=1e-4) for i in range(n) for j in range(n))


def test_text_similarity_is_one_between_equal_embeddings_and_follows_the_text_tower():
    import torch

    from shared_model.pretrain.selection import text_similarity

    class Constant:
        def encode_text(self, texts):
            return torch.ones(len(texts), 4)

    assert text_similarity(Constant(), ["a", "b"])["cosine"] == [[1.0, 1.0], [1.0, 1.0]]
    model = build_model("tiny").eval()  # no dropout: both sides see the same embeddings
    sim = text_similarity(model, ["polyp", "instrument"])["cosine"]
    with torch.no_grad():
        e = model.encode_text(["polyp", "instrument"])
    assert sim[0][1] == pytest.approx(float(torch.cosine_similarity(e[0], e[1], dim=0)), abs=1e-4)


def test_runs_on_the_tiny_foundation(tmp_path, capsys, one_thread):
    out = tmp_path / "sel.json"
    assert main(["text-selection", "--foundation", "tiny", "--scenes", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    report = _check_report(out, 2, "foundation")
    assert report["model"]["pretraining_scene_seed"] == 0 and "text_to_sparse" in report["model"]["path"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    return err[-1]


def test_bad_input_gives_one_line_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["text-selection", "--foundation", "tiny", "--scenes", "0"])
    assert exit_.value.code == 2 and "argument --scenes: must be an integer >= 1, got 0" in _error_line(capsys)
    with pytest.raises(SystemExit):
        main(["text-selection", "--scenes", "3"])
    assert "one of the arguments --checkpoint --foundation is required" in _error_line(capsys)
    missing = tmp_path / "nope.pt"
    assert main(["text-selection", "--checkpoint", str(missing), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --checkpoint: {missing}: checkpoint file not found"]
    assert main(["text-selection", "--foundation", "nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --foundation: 'nope' is neither a packaged foundation")
    assert main(["text-selection", "--foundation", "tiny", "--scene-seed", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --scene-seed 0: the foundation 'tiny' was pre-trained")


def test_the_ground_truth_box_oracle_is_refused(tmp_path, capsys):
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, box_source="ground-truth"))
    path = save_model_checkpoint(tmp_path / "oracle.pt", build_model(cfg))
    assert main(["text-selection", "--checkpoint", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.prompts.box_source is 'ground-truth'" in err[0] and "--checkpoint" in err[0]
