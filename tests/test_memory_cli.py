"""`precondtune memory`: --json shape (SPEC.md), the table, and bad input as one stderr line with exit 2."""
from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES
from typer.testing import CliRunner

from precondtune.cli import app

runner = CliRunner()
MLP = str(EXAMPLES / "mlp.py")
BYTES = ("weights", "gradients", "optimizer_state", "activations", "step_temporaries", "total_peak")


def test_json_shape_and_integer_bytes():
    r = runner.invoke(app, ["memory", MLP, "--optimizer", "adamw,muon", "--batch-size", "4", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {"path", "parameters", "trainable_parameters"} <= set(doc["model"])
    assert {"param_dtype", "state_dtype", "batch_size", "world_size", "sharding", "gpu"} <= set(doc["settings"])
    assert doc["settings"]["batch_size"] == 4 and doc["settings"]["gpu"]
    assert [o["name"] for o in doc["optimizers"]] == ["adamw", "muon"]
    for o in doc["optimizers"]:
        assert {"name", "hyperparameters", "bytes", "fits", "peak_phase"} <= set(o)
        assert all(isinstance(o["bytes"][k], int) for k in BYTES)
        assert o["fits"] is True and o["peak_phase"] in ("forward", "backward", "step")


def test_table_and_fit_against_a_small_gpu():
    r = runner.invoke(app, ["memory", MLP, "-o", "adamw", "--gpu", "l4", "--reserve-gb", "24"])
    assert r.exit_code == 0, r.output
    assert "adamw" in r.stdout and "l4" in r.stdout and "✗" in r.stdout  # nothing left of a 24 GiB L4 after a 24 GiB reserve


def test_max_batch_size_is_reported():
    r = runner.invoke(app, ["memory", MLP, "-o", "adamw", "--gpu", "l4", "--reserve-gb", "23.99", "--max-batch-size",
                            "--json"])
    assert r.exit_code == 0, r.output
    mbs = json.loads(r.stdout)["optimizers"][0]["max_batch_size"]
    assert isinstance(mbs, int) and mbs >= 1


@pytest.mark.parametrize("args, needle", [
    (["-o", "nope"], "unknown optimizer 'nope'"),
    (["--param-dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--gpu", "tpu9000"], "unknown GPU profile 'tpu9000'"),
    (["--sharding", "zero9"], "unknown sharding 'zero9'"),
    (["--world-size", "0"], "world size 0 is out of range"),
])
def test_bad_options_one_line_exit_2(args, needle):
    r = runner.invoke(app, ["memory", MLP, *args])
    assert r.exit_code == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_batch_that_makes_the_model_raise(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom torch import nn\n"
                   "def build_model():\n    return nn.Linear(8, 2)\n"
                   "def sample_batch(batch_size):\n    return torch.randn(batch_size, 5)\n"
                   "def loss_fn(model, batch):\n    return model(batch).sum()\n")
    r = runner.invoke(app, ["memory", str(bad), "-o", "adamw"])
    assert r.exit_code == 2
    assert "bad.py" in r.stderr and "raised" in r.stderr and len(r.stderr.strip().splitlines()) == 1


NO_PARAMS = '''
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.ReLU())

def sample_batch(batch_size):
    return torch.randn(batch_size, 4), torch.randn(batch_size, 4)

def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()
'''


@pytest.mark.parametrize("command", ["profile", "flops", "memory"])
def test_a_model_without_parameters_is_one_line_exit_2(tmp_path, command):
    path = tmp_path / "noparams.py"
    path.write_text(NO_PARAMS)
    r = runner.invoke(app, [command, str(path)])
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_an_infinite_reserve_is_rejected():
    r = runner.invoke(app, ["memory", str(EXAMPLES / "mlp.py"), "--reserve-gb", "inf"])
    assert r.exit_code == 2 and "finite" in r.output
