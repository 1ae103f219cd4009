"""Sophia against a float64 transcription of Algorithm 3 (arXiv 2305.14342) and its two Hessian estimators."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import FlopCounterMode

import precondtune.optim as po
from precondtune.errors import ConfigError
from precondtune.optim import sophia


def _reference(params64, grads, estimates, *, lr, beta1, beta2, rho, eps, wd, k):
    """Algorithm 3 in float64: h refreshed at t mod k = 1, then decay and the clipped step."""
    ps = [p.clone() for p in params64]
    m = [torch.zeros_like(p) for p in ps]
    h = [torch.zeros_like(p) for p in ps]
    for t, (gs, est) in enumerate(zip(grads, estimates), start=1):
        for i, p in enumerate(ps):
            m[i] = beta1 * m[i] + (1 - beta1) * gs[i].double()
            if t % k == 1 % k:
                h[i] = beta2 * h[i] + (1 - beta2) * est[i].double()
            p.mul_(1 - lr * wd)
            p.sub_(lr * torch.clamp(m[i] / torch.clamp(rho * h[i], min=eps), -1, 1))
    return ps


def test_update_matches_float64_transcription_over_steps():
    torch.manual_seed(0)
    shapes = [(6, 5), (7,)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    steps, k = 7, 3
    grads = [[torch.randn(s) * 0.1 for s in shapes] for _ in range(steps)]
    # estimates of mixed sign: negative curvature must fall back to the clipped sign of m
    estimates = [[torch.randn(s).abs() * 0.5 - 0.1 for s in shapes] for _ in range(steps)]
    hp = {"lr": 0.05, "beta1": 0.9, "beta2": 0.95, "rho": 0.5, "eps": 1e-12, "wd": 0.1, "k": k}
    ref = _reference([p.detach().double() for p in params], grads, estimates, **hp)
    opt = sophia.Sophia(params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), rho=hp["rho"], eps=hp["eps"],
                        weight_decay=hp["wd"], k=k)
    refreshed = []
    for gs, est in zip(grads, estimates):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        refreshed.append(opt.hessian_due())
        if refreshed[-1]:
            opt.accumulate_hessian(dict(zip(params, est)))
        opt.step()
    assert refreshed == [True, False, False, True, False, False, True]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-6, atol=1e-6)


def test_state_exists_from_first_step_and_step_has_no_matmul():
    p = torch.randn(8, 4, requires_grad=True)
    opt = po.build("sophia", [p])
    p.grad = torch.randn(8, 4)
    with FlopCounterMode(display=False) as fc:
        opt.step()
    assert fc.get_total_flops() == sophia.step_flops((8, 4), sophia.Config()).matmul == 0
    assert torch.equal(opt.state[p]["hessian"], torch.zeros(8, 4))
    assert sophia.state_bytes((8, 4), torch.float32, sophia.Config()) == 2 * 32 * 4


def _softmax_regression(batch=16, features=5, classes=4):
    torch.manual_seed(1)
    model = nn.Linear(features, classes, bias=False).double()
    x = torch.randn(batch, features, dtype=torch.float64)
    return model, x


def test_gnb_estimate_is_batch_size_times_squared_sampled_gradient():
    model, x = _softmax_regression()
    gen = torch.Generator().manual_seed(3)
    (est,) = sophia.gnb_estimate([model.weight], model, x, lambda m, b: m(b), generator=gen)
    probs = torch.softmax(model(x).detach(), -1)
    labels = torch.multinomial(probs.float(), 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    g = (probs - F.one_hot(labels, probs.shape[-1])).T @ x / x.shape[0]  # ∇W of the mean CE
    torch.testing.assert_close(est, x.shape[0] * g.square(), rtol=1e-10, atol=1e-12)


def test_gnb_and_hutchinson_average_to_the_hessian_diagonal():
    """For softmax regression the CE Hessian diagonal is (1/B)·Σ_b p_bc(1−p_bc)·x_bi² (Bartlett identity)."""
    model, x = _softmax_regression()
    y = torch.randint(4, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    p = torch.softmax(model(x).detach(), -1)
    exact = (p * (1 - p)).T @ x.square() / x.shape[0]
    gen = torch.Generator().manual_seed(5)
    n = 200  # Monte-Carlo draws: the mean's trace is within ~5% (1σ); a factor-B slip would be 16x off
    gnb = sum(sophia.gnb_estimate([model.weight], model, x, lambda m, b: m(b), generator=gen)[0]
              for _ in range(n)) / n
    hut = sum(sophia.hutchinson_estimate([model.weight], model, x, lambda m, b: F.cross_entropy(m(b), y),
                                         generator=gen)[0] for _ in range(n)) / n
    for est in (gnb, hut):
        assert abs(float(est.sum() / exact.sum()) - 1) < 0.1
        torch.testing.assert_close(est, exact, rtol=0.3, atol=0.2 * float(exact.max()))


def test_hutchinson_estimate_is_u_times_hessian_vector_product():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    params = list(model.parameters())
    def loss_fn(m, b):
        return (m(b[0]) - b[1]).pow(2).mean()

    ests = sophia.hutchinson_estimate(params, model, (x, y), loss_fn, generator=torch.Generator().manual_seed(9))
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    shapes = [p.shape for p in params]

    def loss_of(v):
        chunks, k = [], 0
        for s in shapes:
            n = s.numel()
            chunks.append(v[k:k + n].reshape(s))
            k += n
        return (torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], chunks)),
                                           (x,)) - y).pow(2).mean()

    hess = torch.autograd.functional.hessian(loss_of, flat)
    gen = torch.Generator().manual_seed(9)
    u = torch.cat([torch.randn(s, generator=gen, dtype=torch.float64).reshape(-1) for s in shapes])
    torch.testing.assert_close(torch.cat([e.reshape(-1) for e in ests]), u * (hess @ u), rtol=1e-9, atol=1e-12)


class _NoDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - x.tanh() ** 2)


class _FusedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(_NoDoubleBackward.apply(self.a(x)))


def test_hutchinson_fails_clearly_without_double_backward_and_gnb_works():
    torch.manual_seed(0)
    model = _FusedModel()
    x, y = torch.randn(6, 4), torch.randint(3, (6,))
    opt = po.build("sophia", model, estimator="hutchinson")
    with pytest.raises(ConfigError, match="double backward.*estimator='gnb'"):
        opt.update_hessian(model, (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    gnb = po.build("sophia", model, estimator="gnb")
    gnb.update_hessian(model, (x, y), logits_fn=lambda m, b: m(b[0]))
    assert all(float(s["hessian"].sum()) > 0 for s in gnb.state.values())


def test_gnb_without_logits_fn_names_the_fix():
    model, x = _softmax_regression()
    opt = po.build("sophia", model)
    with pytest.raises(ConfigError, match="logits_fn"):
        opt.update_hessian(model, x)


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_an_estimate_that_reaches_no_parameter_is_an_error_not_a_silent_no_op(estimator):
    """A logits_fn/loss_fn running a copy of the model (or FSDP2's unsharded copies) reaches none of the
    optimizer's parameters: every estimate came back None and h silently stayed 0."""
    model, x = _softmax_regression()
    copy = _softmax_regression()[0]
    opt = po.build("sophia", model, estimator=estimator)
    with pytest.raises(ConfigError, match="reached none of its parameters"):
        opt.update_hessian(model, x, loss_fn=lambda m, b: copy(b).logsumexp(-1).mean(),
                           logits_fn=lambda m, b: copy(b))
    opt.update_hessian(model, x, loss_fn=lambda m, b: m(b).logsumexp(-1).mean(), logits_fn=lambda m, b: m(b))
    assert any(bool(opt.state[p]["hessian"].abs().sum() > 0) for p in model.parameters())

def test_training_loop_hook_refreshes_every_k_steps_and_leaves_grads(example):
    mf = example("chargpt")
    torch.manual_seed(0)
    model = mf.build()
    opt = po.build("sophia", model, k=3, lr=1e-3)
    assert not sophia.hessian_step(po.build("adamw", model), model, None)  # no Sophia part: no-op
    ran = []
    for _ in range(7):
        batch = mf.sample_batch(2)
        opt.zero_grad(set_to_none=True)
        mf.loss(model, batch).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        ran.append(sophia.hessian_step(opt, model, batch, mf.raw_loss, mf.logits_fn))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        opt.step()
    assert ran == [True, False, False, True, False, False, True]
    assert all(float(s["hessian"].abs().sum()) > 0 for s in opt.state.values())


def test_from_adamw_and_search_space():
    import optuna

    t = sophia.from_adamw(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert (t.config.lr, t.config.weight_decay, t.config.rho, t.config.betas) == (6e-4, 0.2, 0.05, (0.965, 0.99))
    c = sophia.search_space(optuna.trial.FixedTrial({"lr": 1e-3, "rho": 0.03, "k": 5, "weight_decay": 0.2}))
    assert (c.rho, c.k) == (0.03, 5)


def test_groups_with_their_own_k_refresh_on_their_own_period():
    """Routing can give param groups different k; each group's h is refreshed on its own period (a refresh of the
    k=2 group used to refresh the k=5 group too), and one estimate pass covers the groups due together."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = po.build("sophia", model, k=5, routing=[{"match": "matrix", "name": r"0\.weight", "optimizer": "sophia",
                                                     "hyperparameters": {"k": 2}}])
    fast = next(g for g in opt.param_groups if opt.group_config(g).k == 2)["params"]
    assert [p.shape for p in fast] == [torch.Size([8, 6])]
    x, y = torch.randn(16, 6), torch.randint(3, (16,))
    refreshed: dict[str, list[int]] = {"k=2": [], "k=5": []}
    fold = opt.accumulate_hessian
    now = [0]

    def spy(estimates):
        for key, group in (("k=2", [p for p in estimates if any(p is q for q in fast)]),
                           ("k=5", [p for p in estimates if not any(p is q for q in fast)])):
            if group:
                refreshed[key].append(now[0])
        fold(estimates)

    opt.accumulate_hessian = spy
    for step in range(11):
        now[0] = step
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sophia.hessian_step(opt, model, (x, y), logits_fn=lambda m, b: m(b[0]))
        opt.step()
    assert refreshed == {"k=2": [0, 2, 4, 6, 8, 10], "k=5": [0, 5, 10]}


def test_estimate_shares_are_exact_over_a_cycle():
    """The share of steps on which exactly each set of groups re-estimates, checked against counting a cycle."""
    from fractions import Fraction

    for periods in ([10], [2, 10], [3, 4], [4, 6, 10], [5, 5, 2]):
        cycle = 1
        for k in periods:
            cycle = cycle * k // __import__("math").gcd(cycle, k)
        counted: dict[frozenset[int], int] = {}
        for t in range(cycle):
            due = frozenset(i for i, k in enumerate(periods) if t % k == 0)
            if due:
                counted[due] = counted.get(due, 0) + 1
        assert sophia.estimate_shares(periods) == {s: Fraction(n, cycle) for s, n in counted.items()}, periods
