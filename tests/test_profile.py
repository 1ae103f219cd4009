"""`precondtune profile`: FLOPs equal FlopCounterMode's count, meta 7B profiles without memory, JSON shape."""
from __future__ import annotations

import json
import resource

import torch
from conftest import EXAMPLES, load_example
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from precondtune.cli import app
from precondtune.profiling import count_train_flops, profile_model

runner = CliRunner()


def test_flops_equal_flop_counter_mode_and_analytic_matmuls():
    mf = load_example("mlp")
    model = mf.build()
    batch = mf.sample_batch(16)
    counted = count_train_flops(mf, model, batch)
    with FlopCounterMode(display=False) as fc:
        mf.loss(model, batch).backward()
    assert counted == fc.get_total_flops()
    # forward 2·B·in·out per Linear; backward twice that, except the first layer's input gradient.
    b, dims = 16, [(32, 128), (128, 128), (128, 10)]
    fwd = sum(2 * b * i * o for i, o in dims)
    assert counted == 3 * fwd - 2 * b * 32 * 128


def test_attention_is_counted_on_cpu():
    mf = load_example("chargpt")
    model = mf.build()
    batch = mf.sample_batch(2)
    with FlopCounterMode(display=False) as fused:  # the fused CPU SDPA kernel is not in the table
        mf.loss(model, batch).backward()
    model.zero_grad()
    counted = count_train_flops(mf, model, batch)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as math_path:
        mf.loss(model, batch).backward()
    assert counted == math_path.get_total_flops() > fused.get_total_flops()


def test_meta_7b_profiles_without_allocating_parameter_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    prof = profile_model(load_example("llama7b_meta"), batch_size=1)
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert prof.parameters == 6_738_415_616 and prof.device == "meta" and prof.step_seconds is None
    assert grown_gib < 1.0  # fp32 weights alone would be 25 GiB
    # 6·N·T is the textbook estimate for matmul FLOPs; attention adds to it (seq 4096).
    assert 6 * prof.parameters * 4096 < prof.train_flops_per_step < 1.5 * 6 * prof.parameters * 4096


def test_profile_json_shape_and_measured_time():
    r = runner.invoke(app, ["profile", str(EXAMPLES / "chargpt.py"), "--json", "--batch-size", "4", "--steps", "2",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) >= {"model", "train_flops_per_step", "tokens_per_batch", "device", "step_seconds"}
    assert set(doc["model"]) >= {"path", "parameters", "trainable_parameters", "roles"}
    assert doc["tokens_per_batch"] == 4 * 64 and doc["device"] == "cpu" and doc["step_seconds"] > 0
    assert isinstance(doc["train_flops_per_step"], int)


def test_tokens_per_batch_override_and_bad_device():
    r = runner.invoke(app, ["profile", str(EXAMPLES / "mlp.py"), "--json", "--tokens-per-batch", "1000",
                            "--steps", "0"])
    assert json.loads(r.stdout)["tokens_per_batch"] == 1000
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["profile", str(EXAMPLES / "mlp.py"), "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA device" in r.stderr
    r = runner.invoke(app, ["profile", str(EXAMPLES / "mlp.py"), "--device", "tpu9"])
    assert r.exit_code == 2 and "--device" in r.stderr
