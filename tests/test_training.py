"""The trial's training loop: identical starts, the full schedule on every group, divergence, hooks."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import load_example

import precondtune.optim as po
from precondtune.modelfile import load_model_file
from precondtune.training import Schedule, find_hook, prepare, train


@pytest.fixture(scope="module")
def mlp_data():
    return prepare(load_example("mlp"), steps=12, batch_size=16, seed=0)


def test_schedule_warms_up_then_decays_to_final():
    s = Schedule(100, warmup=10)
    assert s.factor(0) == pytest.approx(0.1) and s.factor(9) == pytest.approx(1.0)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(55) == pytest.approx(0.5, abs=0.02)  # cosine midpoint
    assert s.factor(99) < 0.01
    lin = Schedule(100, warmup=0, decay="linear")
    assert lin.factor(50) == pytest.approx(0.5)
    assert Schedule(50).warmup_steps == 5  # 10% by default
    with pytest.raises(ValueError, match="warmup"):
        Schedule(10, warmup=11)


def test_scheduler_scales_every_group_including_routed_adamw_groups():
    routed = next((n for n in po.available() if po.get_spec(n).roles != po.ALL_ROLES), None)
    if routed is None:
        pytest.skip("no matrix-only optimizer registered")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = po.build(routed, model)
    assert isinstance(opt, po.Routed)
    base = [g["lr"] for g in opt.param_groups]
    assert len(set(base)) > 1  # the main optimizer's lr and AdamW's differ
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(20, warmup=4).factor)
    for _ in range(7):
        opt.step()
        sched.step()
    want = Schedule(20, warmup=4).factor(7)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * want for b in base])


def test_every_trial_starts_from_the_same_weights_and_batches(mlp_data):
    sched = Schedule(12)
    a = train(mlp_data, "adamw", {"lr": 1e-2}, schedule=sched)
    b = train(mlp_data, "adamw", {"lr": 1e-2}, schedule=sched)
    c = train(mlp_data, "adamw", {"lr": 1e-3}, schedule=sched)
    assert a.losses == b.losses and a.eval_loss == b.eval_loss  # bit-identical reruns
    assert a.start_loss == c.start_loss and a.losses[1] != c.losses[1]
    assert a.steps_run == 12 and len(a.step_seconds) == 12 and a.median_step_seconds > 0
    assert a.eval_loss is not None and math.isfinite(a.eval_loss) and a.stop_reason is None
    assert a.seconds >= a.train_seconds


def test_divergence_stops_at_once_with_a_reason(mlp_data):
    r = train(mlp_data, "adamw", {"lr": 50.0}, schedule=Schedule(12, warmup=0))
    assert r.diverged and r.eval_loss is None
    assert r.stop_reason.startswith("diverged") and r.steps_run < 12


def test_callback_reports_window_means_and_can_stop(mlp_data):
    seen = []

    def cb(step, value):
        seen.append((step, value))
        return "stop here" if step == 8 else None

    r = train(mlp_data, "adamw", {"lr": 1e-3}, schedule=Schedule(12), report_every=4, callback=cb)
    assert [s for s, _ in seen] == [4, 8]
    assert seen[0][1] == pytest.approx(sum(r.losses[:4]) / 4)
    assert r.stop_reason == "stop here" and r.steps_run == 8 and r.eval_loss is None


def test_no_verdict_is_asked_at_the_last_step(mlp_data):
    # stopping after the last step would save nothing and lose the run's eval loss; its window is still recorded
    seen = []
    r = train(mlp_data, "adamw", {"lr": 1e-3}, schedule=Schedule(12), report_every=4,
              callback=lambda step, value: seen.append(step) or "stop")
    assert seen == [4]
    r = train(mlp_data, "adamw", {"lr": 1e-3}, schedule=Schedule(12), report_every=4,
              callback=lambda step, value: seen.append(step) and None)
    assert seen == [4, 4, 8] and sorted(r.reports) == [4, 8, 12]
    assert r.stop_reason is None and r.eval_loss is not None


def test_sophia_hessian_hook_is_driven_by_the_loop(mlp_data):
    if "sophia" not in po.available():
        pytest.skip("sophia not registered")
    model = torch.nn.Linear(3, 2)
    assert find_hook(po.build("sophia", model)) is not None
    assert find_hook(po.build("adamw", model)) is None
    r = train(mlp_data, "sophia", {"k": 2}, schedule=Schedule(6))
    assert r.eval_loss is not None and math.isfinite(r.eval_loss)


def test_one_outlier_batch_is_not_divergence(tmp_path):
    # the same outlier batch comes in every trial: a single spike must not prune them all
    path = tmp_path / "spiky.py"
    path.write_text("import torch\n_n = [0]\n"
                    "def build_model():\n    return torch.nn.Linear(4, 1)\n"
                    "def sample_batch(n):\n    _n[0] += 1\n    x = torch.randn(n, 4)\n"
                    "    y = x.sum(1, keepdim=True) + (1000.0 if _n[0] == 8 else 0.0)\n    return x, y\n"
                    "def loss_fn(model, batch):\n    return (model(batch[0]) - batch[1]).square().mean()\n")
    data = prepare(load_model_file(path), steps=12, batch_size=16, seed=0)
    r = train(data, "adamw", {"lr": 1e-3}, schedule=Schedule(12))
    assert max(r.losses) > 1000 * data.start_loss  # the spike is there ...
    assert not r.diverged and r.stop_reason is None and r.eval_loss is not None  # ... and the run goes on


@pytest.mark.parametrize("at", [0, 10])  # SOAP/GaLore decompose at the first step, Iso and Sophia's sampler later too
@pytest.mark.parametrize("name", po.available())
def test_a_nan_loss_is_divergence_for_every_optimizer_even_one_whose_step_decomposes_it(tmp_path, name, at):
    """SOAP's eigh, GaLore's SVD, Iso's eigh and Sophia's label sampling raise on NaN: the trial is diverged, not
    failed."""
    path = tmp_path / "nan_batch.py"
    path.write_text("import torch\n_n = [0]\n"
                    "def build_model():\n"
                    "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))\n"
                    "def sample_batch(n):\n    _n[0] += 1\n    x = torch.randn(n, 8)\n"
                    f"    return x * float('nan') if _n[0] == {at + 1} else x, torch.randint(4, (n,))\n"
                    "def loss_fn(model, batch):\n"
                    "    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])\n"
                    "def logits_fn(model, batch):\n    return model(batch[0])\n")
    data = prepare(load_model_file(path), steps=24, batch_size=8, seed=0)
    r = train(data, name, {}, schedule=Schedule(24))
    assert r.diverged and r.eval_loss is None and r.stop_reason.startswith("diverged: loss nan ")
    assert f"at step {at}" in r.stop_reason and r.steps_run == at + 1, r.stop_reason
