"""Iso and IsoAdam against a float64 transcription (arXiv 2307.12979), their invariances, hooks and costs."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import precondtune.optim as po
from precondtune.errors import ConfigError
from precondtune.optim import iso


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 5, bias=False), nn.Tanh(),
                         nn.Linear(5, 3, bias=False))


def _batches(steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step a list of micro-batches (B, T, features); step 3 accumulates two."""
    g = torch.Generator().manual_seed(1)
    out = []
    for t in range(steps):
        micro = 2 if t == 2 else 1
        out.append([(torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, 3, generator=g)) for _ in range(micro)])
    return out


def _optimizer(cls, model: nn.Sequential, **hp):
    """Iso on the two hidden weights only (the head stays fixed, so the transcription needs no AdamW)."""
    return cls([{"params": [model[0].weight, model[2].weight], "names": ["0.weight", "2.weight"]}], model=model,
               **hp)


def _root64(cov: torch.Tensor, damping: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(0)
    return evecs @ torch.diag((evals + damping * evals[-1]).rsqrt()) @ evecs.T


def _transcription(model: nn.Sequential, batches, *, adam: bool, lr: float, b1: float, b2: float, eps: float,
                   cov_beta: float, damping: float, wd: float, freq: int) -> list[torch.Tensor]:
    """The module docstring's algorithm in float64, covariances taken from explicit activations."""
    ws = [model[k].weight.detach().double().clone() for k in (0, 2, 4)]
    dims = [(8, 6), (5, 8)]
    cin = [torch.zeros(i, i, dtype=torch.float64) for _, i in dims]
    cout = [torch.zeros(o, o, dtype=torch.float64) for o, _ in dims]
    roots: list = [None, None]
    m = [torch.zeros(d, dtype=torch.float64) for d in dims]
    v = [torch.zeros(d, dtype=torch.float64) for d in dims]
    for t, micro in enumerate(batches, start=1):
        grads = [torch.zeros(d, dtype=torch.float64) for d in dims]
        xtx = [torch.zeros_like(c) for c in cin]
        gtg = [torch.zeros_like(c) for c in cout]
        for x, y in micro:
            w0, w1 = (w.clone().requires_grad_() for w in ws[:2])
            z1 = x.double() @ w0.T
            a1 = z1.tanh()
            z2 = a1 @ w1.T
            z1.retain_grad()
            z2.retain_grad()
            F.mse_loss(z2.tanh() @ ws[2].T, y.double()).backward()
            for k, (xin, gout, w) in enumerate(((x.double(), z1.grad, w0), (a1.detach(), z2.grad, w1))):
                xs, gs = xin.reshape(-1, dims[k][1]), gout.reshape(-1, dims[k][0])
                xtx[k] += xs.T @ xs
                gtg[k] += gs.T @ gs
                grads[k] += w.grad
        for k in range(2):
            cin[k] = cov_beta * cin[k] + (1 - cov_beta) * xtx[k]
            cout[k] = cov_beta * cout[k] + (1 - cov_beta) * gtg[k]
            if (t - 1) % freq == 0:
                bc = 1 - cov_beta**t
                roots[k] = (_root64(cout[k] / bc, damping), _root64(cin[k] / bc, damping))
            p = roots[k][0] @ grads[k] @ roots[k][1]
            m[k] = b1 * m[k] + (1 - b1) * p
            ws[k] = ws[k] * (1 - lr * wd)
            if adam:
                v[k] = b2 * v[k] + (1 - b2) * p**2
                ws[k] = ws[k] - lr * (m[k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + eps)
            else:
                ws[k] = ws[k] - lr * m[k] / (1 - b1**t)
    return ws[:2]


def _run(opt, model, batches) -> None:
    for micro in batches:
        opt.zero_grad(set_to_none=True)
        for x, y in micro:
            F.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("variant", ["iso", "iso-adam"])
def test_matches_float64_transcription_over_steps(variant):
    model = _model()
    batches = _batches(6)
    adam = variant == "iso-adam"
    hp = {"lr": 0.02, "cov_beta": 0.9, "damping": 1e-2, "weight_decay": 0.1, "precondition_frequency": 2}
    ref = _transcription(copy.deepcopy(model), batches, adam=adam, b1=0.9, b2=0.99, eps=1e-8, freq=2,
                         **{k: hp[k] for k in ("lr", "cov_beta", "damping")}, wd=hp["weight_decay"])
    if adam:
        opt = _optimizer(iso.IsoAdam, model, betas=(0.9, 0.99), eps=1e-8, **hp)
    else:
        opt = _optimizer(iso.Iso, model, momentum=0.9, **hp)
    _run(opt, model, batches)
    for k, r in zip((0, 2), ref):
        torch.testing.assert_close(model[k].weight.detach().double(), r, rtol=1e-5, atol=1e-6)


def _first_update(scale_loss: float = 1.0, duplicate: bool = False) -> torch.Tensor:
    model = _model()
    w0 = model[0].weight.detach().clone()
    opt = _optimizer(iso.Iso, model)
    x, y = _batches(1)[0][0]
    if duplicate:
        x, y = torch.cat([x, x]), torch.cat([y, y])
    (scale_loss * F.mse_loss(model(x), y)).backward()
    opt.step()
    return model[0].weight.detach() - w0


def test_iso_update_is_invariant_to_loss_scale_and_batch_size():
    base = _first_update()
    torch.testing.assert_close(_first_update(scale_loss=1000.0), base, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(_first_update(duplicate=True), base, rtol=1e-4, atol=1e-7)
    assert torch.linalg.matrix_norm(base, 2) <= iso.Config().lr * (1 + 1e-4)  # spectral norm of P is ≤ 1


def test_step_and_capture_flops_match_flop_counter():
    model = _model()
    opt = iso.Iso([{"params": [model[2].weight]}], model=model, precondition_frequency=10)
    shape, config = (5, 8), iso.Config(precondition_frequency=10)
    expected = iso.step_flops(shape, config)
    x, y = _batches(1)[0][0]
    bare = copy.deepcopy(model)
    counts, captured = [], []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as fc:
            F.mse_loss(model(x), y).backward()
        with FlopCounterMode(display=False) as fc_bare:
            F.mse_loss(bare(x), y).backward()
        captured.append(fc.get_total_flops() - fc_bare.get_total_flops())
        with FlopCounterMode(display=False) as fc:
            opt.step()
        counts.append(fc.get_total_flops())
    assert counts == [expected.matmul + expected.refresh_matmul, expected.matmul]  # refresh step, ordinary step
    assert captured == [iso.capture_flops(shape, tokens=12)] * 2
    assert expected.refresh_other == 9 * (8**3 + 5**3) and expected.every == 10


def test_state_bytes_exact_for_both_variants_and_dtypes():
    from types import SimpleNamespace

    from conftest import measured_state_bytes

    for name, fn in (("iso", iso.state_bytes), ("iso-adam", iso.adam_state_bytes)):
        for dtype in (torch.float32, torch.bfloat16):
            model = _model().to(dtype)
            opt = po.build(name, model)
            x, y = _batches(1)[0][0]
            F.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
            opt.step()
            hidden = (model[0].weight, model[2].weight)  # the head is routed to AdamW
            measured = measured_state_bytes(SimpleNamespace(state={p: opt.state[p] for p in hidden}))
            assert measured == fn((8, 6), dtype, None) + fn((5, 8), dtype, None)


def test_hooks_count_only_backpropagated_forwards_and_die_with_the_optimizer():
    model = _model()
    opt = po.build("iso", model)
    x, y = _batches(1)[0][0]
    with torch.no_grad():
        model(x)
    model(x)  # grad enabled but never back-propagated
    assert not any("cov_in" in s for s in opt.state.values())
    F.mse_loss(model(x), y).backward()
    assert sum("cov_in" in s for s in opt.state.values()) == 2
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items() if torch.is_tensor(v)}
    twin = copy.deepcopy(model)  # carries copies of the hooks; they must not touch this optimizer
    F.mse_loss(twin(x), y).backward()
    assert all(torch.equal(v, opt.state[model[0].weight][k]) for k, v in before.items())
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    assert all(not m._forward_hooks for m in model.modules())


def test_needs_the_model_and_observable_linear_layers():
    with pytest.raises(ConfigError, match="needs the model"):
        po.build("iso", [torch.randn(4, 4, requires_grad=True)])

    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(x @ self.w)

    from precondtune.inventory import inventory

    # by default a matrix that is not an nn.Linear weight goes to AdamW, as other roles do
    assigned = {a.info.name: a.spec.name for a in po.route("iso-adam", inventory(Raw()))}
    assert assigned["w"] == "adamw"
    po.build("iso-adam", Raw())
    with pytest.raises(ConfigError, match="route it to adamw"):  # a rule that sends it to Iso anyway is refused
        po.build("iso-adam", Raw(), routing=[{"match": "matrix", "name": "^w$", "optimizer": "iso-adam"}])

    class Bypassed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(F.linear(x, self.inner.weight))  # the Linear's forward (and its hook) never runs

    model = Bypassed()
    opt = po.build("iso", model)
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ConfigError, match="no inputs/output gradients were captured for inner.weight"):
        opt.step()


def test_transfers():
    t = iso.adam_from_adamw(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert (t.config.lr, t.config.betas, t.config.weight_decay) == (3e-4, (0.9, 0.95), 0.1)
    t = iso.from_adamw(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    assert (t.config.momentum, t.config.weight_decay, t.config.lr) == (0.9, 0.1, iso.Config.lr)


def test_cov_beta_follows_the_loaded_param_groups():
    """After load_state_dict, the hooks read the optimizer's current groups, not the ones it was built with."""
    from torch import nn

    import precondtune.optim as po

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    opt = po.build("iso", model, cov_beta=0.5)
    part = next(p for p in getattr(opt, "parts", [opt]) if type(p).__name__.lower().startswith("iso"))
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        if "cov_beta" in g:
            g["cov_beta"] = 0.9
    opt.load_state_dict(sd)
    x = torch.randn(16, 4)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    x1 = model[0](x)  # the second layer's input
    state = part.state[model[1].weight]
    assert state["captured"]
    torch.testing.assert_close(state["cov_in"], (1 - 0.9) * (x1.mT @ x1).detach())  # 0.5 with the stale groups


class _WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = self.inp(x)
        return self.out((h + self.attn(h, h, h, need_weights=False)[0]).mean(1))


@pytest.mark.parametrize("name", ["iso", "iso-adam"])
def test_attention_out_proj_goes_to_adamw_because_its_forward_is_never_called(name):
    """nn.MultiheadAttention uses its out_proj weight without calling the Linear, so no hook can capture it; Iso
    used to claim it and fail at the first step (stopping `plan` and `memory -o all` on any model with attention)."""
    import precondtune

    torch.manual_seed(0)
    model = _WithAttention()
    opt = po.build(name, model)
    x, y = torch.randn(4, 6, 8), torch.randint(4, (4,))
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    routed = {a.info.name: a.spec.name for a in po.route(name, precondtune.inventory.inventory(model))}
    assert routed["attn.out_proj.weight"] == "adamw" and routed["inp.weight"] == name
    est = precondtune.estimate_memory(model, name, sample_batch=lambda b: torch.randn(b, 6, 8),
                                      loss_fn=lambda m, x: m(x).sum(), batch_size=4)
    assert est["bytes"]["total_peak"] > 0


def test_matrices_iso_cannot_hook_keep_the_tuned_adamw_values():
    """With a tuned AdamW's fallback rule, attention's projections (not called as Linears) and any other matrix Iso
    cannot hook go to AdamW with the tuned values, like the roles Iso does not update; they used to get AdamW's
    defaults (lr 0.001) while the transfer rule said otherwise."""
    import precondtune
    from precondtune.transfer import fallback_rules

    model = _WithAttention()
    infos = precondtune.inventory.inventory(model)
    tuned = {"lr": 0.01, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    routed = po.route("iso", infos, fallback_rules(po.get_spec("iso"), tuned))
    to_adamw = [a for a in routed if a.spec.name == "adamw"]
    assert {a.info.name for a in to_adamw} >= {"attn.in_proj_weight", "attn.out_proj.weight", "out.weight"}
    assert all(a.config.lr == 0.01 and a.config.weight_decay == 0.1 for a in to_adamw)
    assert all(a.config.lr == 0.001 for a in po.route("iso", infos) if a.spec.name == "adamw")  # no rule: defaults


def test_the_fallback_adamw_is_the_last_whole_role_rule_naming_adamw():
    """A rule for one role (embedding, lr 0: frozen) or for named parameters must not decide what the matrices
    Iso cannot hook get; the last AdamW rule without a name filter does (the tuned fallback rule comes last)."""
    import precondtune

    infos = precondtune.inventory.inventory(_WithAttention())
    rules = [{"match": "head", "optimizer": "adamw", "hyperparameters": {"lr": 0.0}},
             {"match": "matrix", "name": "inp", "optimizer": "adamw", "hyperparameters": {"lr": 0.5}},
             {"match": "vector|head|embedding", "optimizer": "adamw", "hyperparameters": {"lr": 3e-4}}]
    routed = {a.info.name: a for a in po.route("iso", infos, rules)}
    assert routed["attn.out_proj.weight"].config.lr == 3e-4 and routed["attn.in_proj_weight"].config.lr == 3e-4
