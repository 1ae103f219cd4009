"""``precondtune flops``: SPEC.md's JSON shape, the table, and one stderr line with exit 2 for bad input."""
from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES
from typer.testing import CliRunner

from precondtune import optim as po
from precondtune.cli import app

runner = CliRunner()
MLP = str(EXAMPLES / "mlp.py")


def test_json_shape_per_spec() -> None:
    result = runner.invoke(app, ["flops", MLP, "--optimizer", "all", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"model", "tokens_per_batch", "train_flops_per_step", "optimizers"} <= set(doc)
    assert {"path", "parameters", "trainable_parameters"} <= set(doc["model"])
    assert doc["train_flops_per_step"] > 0 and doc["tokens_per_batch"] == 8
    names = [o["name"] for o in doc["optimizers"]]
    assert sorted(names) == sorted(po.available())
    overheads = [o["overhead"] for o in doc["optimizers"]]
    assert overheads == sorted(overheads)  # sorted by overhead
    for o in doc["optimizers"]:
        assert {"name", "step_flops", "amortized_step_flops", "overhead", "measured_step_seconds"} <= set(o)
        assert o["measured_step_seconds"] is None and o["predicted_step_seconds"] is None
        assert o["overhead"] == pytest.approx(o["amortized_step_flops"] / doc["train_flops_per_step"])


def test_tokens_per_batch_scales_train_flops_and_gpu_predicts() -> None:
    base = json.loads(runner.invoke(app, ["flops", MLP, "-o", "adamw", "--json"]).stdout)
    result = runner.invoke(app, ["flops", MLP, "-o", "adamw", "--tokens-per-batch", "80", "--gpu", "H100",
                                 "--mfu", "0.5", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["train_flops_per_step"] == 10 * base["train_flops_per_step"]
    assert doc["gpu"]["profile"] == "h100-sxm-80gb" and doc["gpu"]["mfu"] == 0.5
    adamw = doc["optimizers"][0]
    assert adamw["predicted_step_seconds"] > doc["gpu"]["predicted_train_seconds"] > 0
    assert adamw["predicted_time_overhead"] == 0


def test_table_and_measure() -> None:
    result = runner.invoke(app, ["flops", MLP, "-o", "adamw", "--measure", "--steps", "3", "--warmup", "1",
                                 "--device", "cpu", "--gpu", "a100-80gb"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.stderr
    assert "adamw" in result.stdout and "measured (median)" in result.stdout
    assert "predicted step" in result.stdout and "MFU 40%" in result.stdout


def test_a_model_with_no_counted_flops_has_no_overhead_ratio(tmp_path) -> None:
    """FlopCounterMode counts no elementwise op: an embedding-only model has F = 0 and no ratio, not ``inf%``."""
    path = tmp_path / "emb.py"
    path.write_text("import torch\n"
                    "def build_model():\n    return torch.nn.Embedding(10, 4)\n"
                    "def sample_batch(n):\n    return torch.randint(10, (n, 3))\n"
                    "def loss_fn(model, batch):\n    return model(batch).pow(2).mean()\n")
    doc = json.loads(runner.invoke(app, ["flops", str(path), "-o", "adamw,muon", "--json"]).stdout)
    assert doc["train_flops_per_step"] == 0 and [o["overhead"] for o in doc["optimizers"]] == [None, None]
    result = runner.invoke(app, ["flops", str(path), "-o", "adamw"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "inf%" not in text and "finds none in this model's forward+backward: no overhead ratio" in text


@pytest.mark.parametrize("args,needle", [
    (["-o", "no-such-optimizer"], "unknown optimizer"),
    (["--gpu", "no-such-gpu"], "unknown GPU profile"),
    (["--mfu", "1.5"], "--mfu"),
    (["--mfu", "0"], "--mfu"),
    (["--mbu", "-1"], "--mbu"),
    (["--tokens-per-batch", "0"], "--tokens-per-batch"),
    (["--matmul-dtype", "int3"], "unknown dtype"),
    (["--matmul-dtype", "fp64", "--gpu", "h100-sxm-80gb"], "bf16/fp16 and fp32"),
    (["--mbu", "2"], "e.g. --mbu 0.8"),
])
def test_bad_input_is_one_line_exit_2(args: list[str], needle: str) -> None:
    result = runner.invoke(app, ["flops", MLP, *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_measure_on_a_meta_model_is_refused() -> None:
    result = runner.invoke(app, ["flops", str(EXAMPLES / "llama7b_meta.py"), "-o", "adamw", "--measure"])
    assert result.exit_code == 2 and "meta device" in result.stderr


def test_piped_stderr_gets_the_one_error_line_and_nothing_else():
    """With stderr not a terminal the progress bar stays off: it used to print an empty line before the error."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "precondtune", "flops", str(EXAMPLES / "mlp.py"), "--device", "cuda:3",
                        "--measure"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --device cuda:3") and r.stderr.count("\n") == 1, r.stderr
