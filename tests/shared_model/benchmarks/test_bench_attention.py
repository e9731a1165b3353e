"""The attention benchmark runs every implementation on the same weights and input."""

import json

from cli.main import main


def test_bench_attention_cli_times_every_implementation(tmp_path, capsys):
    path = tmp_path / "attention.json"
    assert main(["bench", "attention", "--image-size", "64", "--batch", "1", "--steps", "2", "--warmup", "0",
                 "--out", str(path)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert set(result["seconds"]) == {"sam", "eager", "sdpa"} and set(result["vs_sam"]) == {"eager", "sdpa"}
    assert result["vs_sam"]["eager"]["repeats"] == 2
    assert max(result["max_abs_diff"].values()) < 1e-4  # same weights, same function
    assert json.loads(path.read_text())["results"] == [result]
    assert main(["bench", "attention", "--image-size", "64", "128", "--batch", "1"]) == 2
    assert "--image-size and --batch" in capsys.readouterr().err
