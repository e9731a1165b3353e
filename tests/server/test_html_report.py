"""The HTML run report: self-contained, complete, rendered by headless Chromium, and `promptsam report`."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from server.html_report import PANELS, overlay_examples, write_html_report
from server.report import summarize, write_report
from cli.main import main as promptsam
from shared_model.config import (DataConfig, FederationConfig, PartitionConfig, PrivacyConfig, TrainConfig,
                                 get_preset, to_run_config)
from shared_model.data.dataset import PolypDataset
from shared_model.data.folder import list_samples
from shared_model.modeling.prompt_sam import build_model
from simulation.experiment import PROJECT_ROOT
from simulation.inprocess import run_inprocess
from tests.server.test_report import _rows, _same_data_rows

DEMO = PROJECT_ROOT / "simulation" / "configs" / "demo.yaml"
FAST = {
    "federation.num_server_rounds": 1,
    "federation.local_steps": 2,
    "train.batch_size": 2,
    "synthetic.per_centre": 10,
    "synthetic.image_size": 64,
}
WINDOW = (1280, 2400)


pytestmark = pytest.mark.usefixtures("one_thread")


class Page(HTMLParser):
    """Links, tables (by class: body rows of [cell text, images in the cell]) and element ids of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self.ids: set[str] = set()
        self.tables: dict[str, list[list[list]]] = {}
        self.heads: dict[str, list[str]] = {}
        self._table: str | None = None
        self._part = ""
        self._cell: list | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("src", "href", "srcset", "action", "data"):
            if attrs.get(key) is not None:
                self.links.append((tag, key, attrs[key]))
        if tag == "table":
            self._table = attrs.get("class") or ""
            self.tables.setdefault(self._table, [])
            self.heads.setdefault(self._table, [])
        elif tag in ("thead", "tbody"):
            self._part = tag
        elif tag == "tr" and self._part == "tbody":
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = ["", 0]
        elif tag == "img" and self._cell is not None:
            self._cell[1] += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            cell, self._cell = self._cell, None
            cell[0] = cell[0].strip()
            if tag == "td" and self._part == "tbody":
                self.tables[self._table][-1].append(cell)
            elif tag == "th":
                self.heads[self._table].append(cell[0])
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def _run_config(**privacy) -> dict:
    return to_run_config(FederationConfig(run_dir="runs/x"), PartitionConfig(), {"preset": "tiny"}, TrainConfig(),
                         DataConfig(root="<data & more>"), PrivacyConfig(**privacy))


@pytest.fixture(scope="module")
def overlays(_synthetic_master):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"))
    dataset = PolypDataset(list_samples(_synthetic_master)[0], model.image_size)
    return overlay_examples(model, dataset, n=6)


def _write(run_dir: Path, rows: list[dict], overlays, run_config: dict | None = None) -> Path:
    extra = {"best_dice": 0.5, "eval_prompt": "class",
             "best_round_test": {"dice": 0.42, "iou": 0.3, "hd95": 9.5, "n": 10},
             "best_round_test_by_centre": {"centre_0": {"dice": 0.4, "iou": 0.3, "hd95": 9.0, "n": 5}},
             "constant_mask_baseline": {"fitted_on": "pooled training split (30 images)", "threshold": 0.3,
                                        "pooled": {"dice": 0.21, "iou": 0.1, "hd95": 30.0, "n": 10},
                                        "by_centre": {"centre_0": {"dice": 0.19, "iou": 0.1, "hd95": 31.0, "n": 5}}}}
    write_report(run_dir, rows, 2, extra)
    return write_html_report(run_dir, rows, summarize(rows, 2, extra),
                             _run_config() if run_config is None else run_config, overlays,
                             overlay_source="Best state (round 2) on 6 images.")


def _dp_rows() -> list[dict]:
    rows = _rows()
    for row in rows:
        if row["kind"] == "round":
            row.update({"epsilon-central": 1.25 * row["round"], "epsilon-local-max": None, "declined": 0})
    return rows


def test_overlay_examples_are_deterministic_pngs_with_dice(overlays, _synthetic_master):
    assert len(overlays) == 6
    assert {o["centre"] for o in overlays} == {"centre_0", "centre_1", "centre_2"}  # spread over the pooled set
    for ex in overlays:
        assert list(ex["panels"]) == list(PANELS)
        assert all(png[:4] == b"\x89PNG" for png in ex["panels"].values())
        assert 0.0 <= ex["dice"] <= 1.0 and ex["text"]


def test_html_is_self_contained_and_complete(tmp_path, overlays):
    rows = _rows()
    for row in rows:  # train replies' local validation Dice and an evil hospital name
        if row["kind"] == "train" and row["accepted"]:
            row["val-dice"] = 0.3
        if row.get("hospital") == "c":
            row["hospital"], row["reason"] = "<em>c&d</em>", "non-finite values in <arrays>"
    run_config = {**_run_config(), "strategy": "<script>alert(1)</script>"}
    path = _write(tmp_path, rows, overlays, run_config)
    assert path == tmp_path / "report.html" and (tmp_path / "report.md").is_file()
    text = path.read_text()
    page = Page(text)
    assert page.links and all(v.startswith("data:image/png;base64,") if k == "src" else v.startswith("#")
                              for _, k, v in page.links), [link[:2] + (link[2][:40],) for link in page.links]
    assert not page.tags & {"script", "link", "iframe", "object", "em"}  # escaped, nothing loaded
    assert "url(" not in text and "@import" not in text and "&lt;em&gt;c&amp;d&lt;/em&gt;" in text

    kv = {cells[0][0]: cells[1][0] for name, table in page.tables.items() if name == "kv" for cells in table}
    switches = ("privacy-local-dp", "privacy-central-dp", "privacy-secagg")
    assert {k for k in run_config if not k.startswith("privacy-")} | set(switches) == set(kv)
    assert [kv[k] for k in switches] == ["off"] * 3  # DP off: no epsilon 8.0, no deltas, no clipping norms
    assert "<details>" in text and '"preset": "tiny"' in text.replace("&quot;", '"')

    rounds = page.tables["rounds"]
    assert [r[0][0] for r in rounds] == ["0", "1", "2"]
    assert {"a", "b"} <= set(page.heads["rounds"]) and "train replies: local val-Dice" in page.heads["rounds"]
    assert [c[0] for c in rounds[2]][:5] == ["2", "0.5000", "0.2500", "8.00", "0.5000"]
    assert [r[0][0] for r in page.tables["payload"]] == ["1", "2"]
    arithmetic = "4,800 B in all = 2 clients x 2 rounds x (400 B up + 2 x 400 B down: train and evaluate)."
    assert text.count(arithmetic) == 2  # under the summary cards and in the payload section
    assert "Federated Dice: the mean of the hospitals&#x27; Dice" in text and "same images" not in text
    assert [r[5][0] for r in page.tables["dropped"]] == ["non-finite values in <arrays>"] * 2
    assert "privacy" not in page.ids and "epsilon" not in page.tables

    grid = page.tables["grid"]
    assert page.heads["grid"] == list(PANELS)
    assert len(grid) == 6 and all(len(row) == 5 and all(c[1] == 1 for c in row) for row in grid)
    assert all(row[4][0].startswith("Dice ") for row in grid)
    test = page.tables["test"]
    assert [r[0][0] for r in test] == ["pooled", "centre_0"] and test[0][1][0] == "0.4200"
    assert page.heads["test"][-1] == "constant-mask Dice" and [r[5][0] for r in test] == ["0.2100", "0.1900"]
    assert "Evaluation prompt: class (the class name only" in text and "pooled training split (30 images)" in text


def test_privacy_settings_shown_only_for_what_is_on(tmp_path):
    page = Page(_write(tmp_path, _dp_rows(), None, _run_config(local_dp=True)).read_text())
    kv = {cells[0][0]: cells[1][0] for name, table in page.tables.items() if name == "kv" for cells in table}
    assert (kv["privacy-local-dp"], kv["privacy-epsilon"], kv["privacy-delta"]) == ("true", "8.0", "1e-05")
    assert (kv["privacy-central-dp"], kv["privacy-secagg"]) == ("off", "off")
    assert not {k for k in kv if k.startswith(("privacy-central-", "privacy-adaptive-", "privacy-secagg-"))
                and k != "privacy-central-dp"}


def test_one_dice_column_when_federated_and_global_are_the_same_images(tmp_path):
    page = Page(_write(tmp_path, _same_data_rows(), None).read_text())
    heads = page.heads["rounds"]
    assert "Dice (= federated mean)" in heads and "mean" not in heads and {"a", "b"} <= set(heads)
    assert [c[0] for c in page.tables["rounds"][2]][:4] == ["2", "0.5000", "0.2500", "8.00"]
    assert "they are the same images" in (tmp_path / "report.html").read_text()


def test_saliency_panels_are_heatmaps_with_a_colour_bar(tmp_path, overlays):
    from PIL import Image

    for ex in overlays:  # normalised per image: the least salient parts are blue, not the tissue's colour
        heat, plain = (np.asarray(Image.open(io.BytesIO(ex["panels"][p])).convert("RGB")).astype(int)
                       for p in ("saliency", "image"))
        assert ((heat[..., 2] - heat[..., 0]) > 40).mean() > 0.25 > ((plain[..., 2] - plain[..., 0]) > 40).mean()
    text = _write(tmp_path, _rows(), overlays).read_text()
    assert '<figure class="cbar"><img alt="saliency colour bar" src="data:image/png;base64,' in text
    assert "0 = the image's least salient pixel, 1 = its most salient" in text


def test_epsilon_section_only_with_dp_rows_and_no_grid_without_eval_data(tmp_path):
    rows = _dp_rows()
    (run_dir := tmp_path / "run").mkdir()
    summary = summarize(rows, 2, {"privacy": {"local_dp": False, "local_delta": None, "central_dp": "fixed",
                                              "central_delta": 1e-5, "secagg": False}})
    page = Page(write_html_report(run_dir, rows, summary, _run_config(central_dp="fixed"), None).read_text())
    settings = {c[0][0]: c[1][0] for c in page.tables["kv"]}
    assert {k: settings[k] for k in ("local_dp", "central_dp", "central_delta", "secagg")} == {
        "local_dp": "off", "central_dp": "fixed", "central_delta": "1e-05", "secagg": "off"}
    assert "local_delta" not in settings and settings["privacy-central-noise-multiplier"] == "1.0"
    page = Page(_write(tmp_path, _dp_rows(), None).read_text())
    assert "privacy" in page.ids
    assert [[c[0] for c in r[:3]] for r in page.tables["epsilon"]] == [["1", "1.250", "-"], ["2", "2.500", "-"]]
    assert "grid" not in page.tables and "examples" in page.ids
    assert "no evaluation data (global-eval = none" in (tmp_path / "report.html").read_text()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    message = "headless Chromium not found (Debian: apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def test_report_renders_in_headless_chromium(tmp_path, overlays):
    browser = _chromium()
    (tmp_path / "run").mkdir()
    path = _write(tmp_path / "run", _dp_rows(), overlays)
    shot = tmp_path / "report.png"
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           f"--screenshot={shot}", path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == WINDOW
        pixels = np.asarray(img.convert("RGB")).astype(np.int16)
    assert pixels.std() > 30 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 5000  # not blank
    spread = pixels.max(2) - pixels.min(2)  # 0 for white/grey, large for the coloured images
    coloured_rows = np.nonzero((spread > 60).mean(1) > 0.25)[0]
    grid_rows = coloured_rows[coloured_rows > 700]  # below the header, the cards and the plots
    assert len(grid_rows) > 400, coloured_rows  # the overlay grid: rows of 210 px colour images


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("run")
    run_inprocess(DEMO, FAST, run_dir)
    return run_dir


def test_server_writes_html_report_and_promptsam_report_regenerates_it(finished_run, capsys):
    html = finished_run / "report.html"
    assert (finished_run / "run_config.json").is_file() and html.is_file()
    grid = Page(html.read_text()).tables["grid"]
    assert 1 <= len(grid) <= 6 and all(len(row) == 5 for row in grid)
    for name in ("report.md", "report.html", "dice.png"):
        (finished_run / name).unlink()
    assert promptsam(["report", str(finished_run), "--overlays", "2"]) == 0
    assert str(html) in capsys.readouterr().out
    page = Page(html.read_text())
    assert (finished_run / "report.md").is_file() and (finished_run / "dice.png").is_file()
    assert len(page.tables["grid"]) == 2 and [r[0][0] for r in page.tables["rounds"]] == ["0", "1"]
    assert {"centre_0", "centre_1", "centre_2"} <= set(page.heads["rounds"])
    assert "num-server-rounds" in {r[0][0] for r in page.tables["kv"]}
    assert "pooled" in {r[0][0] for r in page.tables["test"]}  # the test Dice kept from summary.json
    assert promptsam(["report", str(finished_run), "--overlays", "0"]) == 0
    assert "not requested (--overlays 0)" in html.read_text()


def test_promptsam_report_errors_name_the_file(tmp_path, capsys):
    assert promptsam(["report", str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'}: no metrics.jsonl" in capsys.readouterr().err
    assert promptsam(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: run folder not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert promptsam(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl: empty" in capsys.readouterr().err
