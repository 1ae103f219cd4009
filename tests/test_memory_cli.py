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
    r = runner.invoke(app, ["memory", MLP, "-o", "adamw", "--gpu", "l4", "--reserve-gb", "23.9999"])
    assert r.exit_code == 0, r.output
    assert "adamw" in r.stdout and "l4" in r.stdout and "✗" in r.stdout  # ~100 KiB left of a 24 GiB L4


def test_max_batch_size_is_reported():
    r = runner.invoke(app, ["memory", MLP, "-o", "adamw", "--gpu", "l4", "--reserve-gb", "23.99", "--max-batch-size",
                            "--json"])
    assert r.exit_code == 0, r.output
    mbs = json.loads(r.stdout)["optimizers"][0]["max_batch_size"]
    assert isinstance(mbs, int) and mbs >= 1


def test_max_batch_size_says_where_its_search_stops_and_when_it_cannot_search(tmp_path):
    r = runner.invoke(app, ["memory", MLP, "-o", "adamw", "--gpu", "l4", "--max-batch-size"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "≥ 1,048,576" in r.stdout and "the search stops at 1048576" in r.stdout
    model = tmp_path / "nobatch.py"
    model.write_text("import torch.nn as nn\n"
                     "def build_model():\n    return nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 32), nn.GELU(), "
                     "nn.Linear(32, 16), nn.Linear(16, 100))\n")
    r = runner.invoke(app, ["memory", str(model), "-o", "iso,adamw", "--max-batch-size", "--json"])
    assert r.exit_code == 0, r.output
    iso, adamw = json.loads(r.stdout)["optimizers"]
    assert iso["max_batch_size"] is None and "max_batch_size not searched: no sample_batch" in " ".join(iso["notes"])
    assert any("iso's step was not traced" in n for n in iso["notes"])  # its step_temporaries are an under-count
    assert not any("step was not traced" in n for n in adamw["notes"])


def test_the_master_copy_is_named_apart_from_the_weights_in_the_caption():
    r = runner.invoke(app, ["memory", MLP, "-o", "adamw", "--param-dtype", "bf16", "--master-weights"],
                      env={"COLUMNS": "300"})
    assert r.exit_code == 0 and "weights 43.52 KiB + 87.04 KiB fp32 master copy" in r.stdout, r.stdout


@pytest.mark.parametrize("args, needle", [
    (["-o", "nope"], "unknown optimizer 'nope'"),
    (["--param-dtype", "fp8"], "--param-dtype: unknown dtype 'fp8'"),
    (["--gpu", "tpu9000"], "unknown GPU profile 'tpu9000'"),
    (["--sharding", "zero9"], "--sharding 'zero9' is unknown"),
    (["--world-size", "0"], "--world-size 0 is out of range"),
    (["--reserve-gb", "-1"], "--reserve-gb -1.0 is out of range"),
    (["--gpu", "a100"], "matches a100-40gb, a100-80gb"),  # 40 or 80 GB: not guessed
    (["--reserve-gb", "200"], "keeps back all of"),
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


@pytest.mark.parametrize("args, needle, applies", [
    (["--master-weights"], "--master-weights: the parameters are already fp32", False),
    (["--master-weights", "--param-dtype", "bf16"], "--master-weights", True),
    (["--bucket-view"], "--bucket-view changes nothing here", False),
    (["--bucket-view", "--world-size", "2"], "--bucket-view", True),
    (["--param-dtype", "fp16"], "pure float16 weights do not train", False),
    (["--param-dtype", "fp16", "--master-weights"], "pure float16 weights do not train", True),
])
def test_an_option_that_changes_nothing_for_this_model_says_so(args, needle, applies):
    r = runner.invoke(app, ["memory", MLP, "-o", "adamw", *args, "--json"])
    assert r.exit_code == 0, r.output
    notes = " ".join(json.loads(r.stdout)["optimizers"][0]["notes"])
    assert (needle in notes) != applies, notes
