"""Sophia: clipped diagonal-Hessian preconditioning (Liu et al., arXiv 2305.14342, Algorithm 3).

    m ← β1·m + (1−β1)·g                                        every step
    h ← β2·h + (1−β2)·ĥ                                        every k steps (before the update)
    θ ← θ·(1 − lr·wd) − lr·clip(m / max(ρ·h, ε), 1)            clip to [−1, 1] per coordinate

``ρ`` is the paper's γ (the curvature scale); it is named ``rho`` as in the official implementation
(github.com/Liuhong99/Sophia), whose ``lr`` is likewise the step size of the clipped update. That code stores
h = EMA(ĝ⊙ĝ) and multiplies by the batch size in the denominator (ρ·bs·h); here h is the EMA of the paper's
estimate ĥ = B·ĝ⊙ĝ itself, so ``rho`` has the same meaning and the same values (0.01–0.1) as there. The
paper's max(ρh, ε) form (not the official code's ρh + 1e-15) is kept so that negative Hutchinson estimates
fall back to the clipped sign of m instead of flipping the step.

The estimators, ĥ for the mean loss of one batch (paper Algorithms 1 and 2):

* ``"gnb"`` (Gauss–Newton–Bartlett, SophiaG): sample ŷ ~ softmax(logits), ĝ = ∇ mean-CE(logits, ŷ) over the
  B label positions, ĥ = B·ĝ⊙ĝ. Needs the model's logits: ``logits_fn(model, batch)`` (model-file contract).
* ``"hutchinson"`` (SophiaH): u ~ N(0, I), ĥ = u ⊙ ∇⟨∇L, u⟩ — a Hessian-vector product, so the model must
  support a double backward; when it cannot (custom ``once_differentiable`` kernels, some fused attention
  kernels) a :class:`~precondtune.errors.ConfigError` says so and suggests ``estimator="gnb"``.

Using it:

* Plain loop — ``loss.backward(); opt.step()`` works as is; h stays 0 (the update is then the clipped sign
  of m, like the official code before its first estimate) until you refresh it. Every k steps, after
  ``backward`` and before ``step``::

      if opt.hessian_due():
          opt.update_hessian(model, batch, loss_fn, logits_fn)     # or loss_fn only for "hutchinson"

  ``update_hessian`` runs its own forward/backward with ``torch.autograd.grad``; ``.grad`` is left untouched.
  ``opt.accumulate_hessian({param: estimate})`` folds in estimates computed elsewhere.
* precondtune's training loop calls :func:`hessian_step` every step (after ``backward``, before ``step``);
  it finds the Sophia part of a routed optimizer, refreshes h when due (upcoming step t with t mod k = 1,
  as in Algorithm 3) and is a no-op for every other optimizer.

Param groups may have their own k (routing rules): each group's h is refreshed on its own period, and one
estimate pass covers the groups due together.

Cost: the optimizer step itself has no matmul; the estimate costs one extra forward+backward of the model
(GNB) or about three (Hutchinson: a backward with ``create_graph``, then the Hessian-vector product through
it, Pearlmutter 1994) every k steps. That is a model-level cost, not a per-parameter one, so
:func:`step_flops` reports ``StepFlops(every=k)`` with zero matmul and :func:`estimate_passes` gives the
amortized passes in units of the model's forward+backward.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dtypes import itemsize
from ..errors import ConfigError
from . import _space
from ._replicas import replica_group
from .kernels import adam
from .registry import ALL_ROLES, OptimizerSpec, PrecondOptimizer, Routed, StepFlops, Transfer, check_range

ESTIMATORS = ("gnb", "hutchinson")
HESSIAN_PASSES = {"gnb": 1.0, "hutchinson": 3.0}
"""Extra forward+backward passes per estimate when they cannot be counted on the model: GNB one (the
sampled-label loss); Hutchinson three (a backward with ``create_graph``, then the Hessian-vector product
through it: ``FlopCounterMode`` counts 2.9–3.0 of the training forward+backward on the bundled examples)."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """Sophia hyperparameters; defaults are the official implementation's (github.com/Liuhong99/Sophia)."""

    lr: float = 6e-4
    """Step size of the clipped update (the README's GPT-2 125M value; the same as AdamW's there)."""
    betas: tuple[float, float] = (0.965, 0.99)
    """EMA coefficients of the gradient (β1) and of the Hessian estimate (β2, one EMA update per estimate)."""
    rho: float = 0.04
    """Curvature scale (the paper's γ): the update is clip(m / max(ρ·h, ε), 1)."""
    eps: float = 1e-12
    """Floor of ρ·h (the paper's ε)."""
    weight_decay: float = 0.1
    """Decoupled weight decay θ ← θ·(1 − lr·wd) (official default; the README suggests ~2× AdamW's)."""
    k: int = 10
    """Refresh period of the Hessian estimate in steps (paper: k = 10)."""
    estimator: str = "gnb"
    """``"gnb"`` (Gauss–Newton–Bartlett, needs logits) or ``"hutchinson"`` (needs a double backward)."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, self.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
        check_range("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "two values in [0, 1)")
        check_range("rho", self.rho, self.rho > 0, "> 0")
        check_range("eps", self.eps, self.eps > 0, "> 0")
        check_range("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        check_range("k", self.k, isinstance(self.k, int) and self.k >= 1, "an integer >= 1")
        check_range("estimator", self.estimator, self.estimator in ESTIMATORS, " or ".join(ESTIMATORS))


def sophia_update_(p: Tensor, g: Tensor, m: Tensor, h: Tensor, *, lr: float, beta1: float, rho: float,
                   eps: float, weight_decay: float) -> None:
    """One Sophia step in place: decay, m ← EMA(g), θ ← θ − lr·clip(m / max(ρ·h, ε), 1)."""
    adam.decay_(p, lr, weight_decay)
    m.lerp_(g, 1 - beta1)
    denom = (h * rho).clamp_(min=eps)
    p.add_(torch.div(m, denom).clamp_(-1.0, 1.0), alpha=-lr)


def hessian_ema_(h: Tensor, estimate: Tensor, beta2: float) -> None:
    """h ← β2·h + (1−β2)·ĥ, in place."""
    h.mul_(beta2).add_(estimate.to(h.dtype), alpha=1 - beta2)


def _sampled_loss(model: nn.Module, batch: Any, logits_fn: Callable[[nn.Module, Any], Tensor] | None,
                  generator: torch.Generator | None) -> tuple[Tensor, int]:
    """mean CE(logits, ŷ) with ŷ ~ softmax(logits), and the number of sampled rows (Algorithm 2)."""
    if logits_fn is None:
        raise ConfigError("Sophia's Gauss-Newton-Bartlett estimator samples labels from the model's logits: "
                          "define logits_fn(model, batch) in the model file, or use the Hutchinson estimator "
                          "(--set estimator=hutchinson; in Python estimator='hutchinson')")
    logits = logits_fn(model, batch)
    if not torch.is_tensor(logits) or logits.dim() < 2:
        raise ConfigError("logits_fn(model, batch) must return a tensor of logits with the classes in the "
                          f"last dimension; got {type(logits).__name__} "
                          f"{tuple(logits.shape) if torch.is_tensor(logits) else ''}")
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):  # sample and take the CE in float32
        flat = flat.float()
    with torch.no_grad():
        labels = torch.multinomial(flat.softmax(-1), 1, generator=generator).squeeze(-1)
    return F.cross_entropy(flat, labels), flat.shape[0]


def gnb_estimate(params: list[Tensor], model: nn.Module, batch: Any,
                 logits_fn: Callable[[nn.Module, Any], Tensor] | None, *,
                 generator: torch.Generator | None = None) -> list[Tensor | None]:
    """Gauss–Newton–Bartlett: ĥ = B·ĝ⊙ĝ with ĝ = ∇ mean CE(logits, ŷ), ŷ ~ softmax(logits) (Algorithm 2)."""
    with torch.enable_grad():
        loss, b = _sampled_loss(model, batch, logits_fn, generator)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [None if g is None else g.square().mul_(b) for g in grads]


def gnb_estimate_sharded(params: list[Tensor], model: nn.Module, batch: Any,
                         logits_fn: Callable[[nn.Module, Any], Tensor] | None, *,
                         generator: torch.Generator | None = None) -> list[Tensor | None]:
    """GNB on FSDP2's sharded (DTensor) parameters. FSDP2 runs the forward on unsharded copies, so
    ``autograd.grad`` with respect to the shards finds nothing; the sampled loss goes through FSDP2's own backward
    instead, which reduce-scatters ĝ into each shard's ``.grad`` averaged over the mesh (the gradient of the batch
    over all ranks), and B counts that batch. Every ``.grad`` of the model is set aside for it and restored."""
    everything = list(model.parameters())
    saved = [p.grad for p in everything]
    for p in everything:
        p.grad = None
    try:
        with torch.enable_grad():
            loss, b = _sampled_loss(model, batch, logits_fn, generator)
            loss.backward()
        ranks = params[0].device_mesh.size()
        return [None if p.grad is None else p.grad.square().mul_(b * ranks) for p in params]
    finally:
        for p, g in zip(everything, saved):
            p.grad = g


def hutchinson_estimate(params: list[Tensor], model: nn.Module, batch: Any,
                        loss_fn: Callable[[nn.Module, Any], Tensor] | None, *,
                        generator: torch.Generator | None = None) -> list[Tensor | None]:
    """Hutchinson: ĥ = u ⊙ (∇²L·u), u ~ N(0, I) (Algorithm 1); needs a double backward through the model."""
    if loss_fn is None:
        from ..modelfile import default_loss

        loss_fn = default_loss
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        if all(g is None for g in grads):  # the loss does not reach these parameters (the caller says so)
            return [None] * len(params)
        live = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
        us = {k: torch.randn(params[k].shape, generator=generator, device=params[k].device,
                             dtype=params[k].dtype) for k in live}
        if not live:
            raise _no_double_backward("the gradient does not depend on the parameters through a graph "
                                      "(the backward was not differentiable)")
        if _has_once_differentiable(grads[k] for k in live):
            raise _no_double_backward("a custom autograd Function marked @once_differentiable is in the graph; "
                                      "its second derivative would be silently dropped")
        try:
            hvps = torch.autograd.grad([grads[k] for k in live], [params[k] for k in live],
                                       grad_outputs=[us[k] for k in live], allow_unused=True)
        except (RuntimeError, NotImplementedError) as e:
            raise _no_double_backward(" ".join(str(e).split())[:200]) from e
    out: list[Tensor | None] = [None] * len(params)
    for k, hv in zip(live, hvps):
        out[k] = us[k] * hv if hv is not None else torch.zeros_like(params[k])
    for k, g in enumerate(grads):
        if g is not None and out[k] is None:  # gradient constant in θ: zero curvature
            out[k] = torch.zeros_like(params[k])
    return out


def _has_once_differentiable(roots: Iterable[Tensor]) -> bool:
    """Whether the graph of ``roots`` holds the error node ``@once_differentiable`` leaves in a double backward.

    That node hangs off detached leaves, so a Hessian-vector product never runs it and would silently miss
    the function's curvature instead of raising; finding it up front turns that into a clear error.
    """
    stack = [g.grad_fn for g in roots if g.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in ("Error", "DelayedError"):
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def _no_double_backward(why: str) -> ConfigError:
    return ConfigError("Sophia's Hutchinson estimator needs a Hessian-vector product (a double backward) and this "
                       f"model does not support one ({why}); use estimator='gnb' (Gauss-Newton-Bartlett, needs "
                       "logits_fn) instead")


class Sophia(PrecondOptimizer):
    """Sophia over param groups; see the module docstring for how the Hessian estimate is refreshed."""

    runs_on_dtensor = True  # tests/test_distributed.py

    Config = Config

    def _state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_group(self, group: dict[str, Any], c: Config) -> None:
        for p in self._params_with_grad(group):
            state = self._state(p)
            state["step"] += 1
            sophia_update_(p, p.grad, state["exp_avg"], state["hessian"], lr=c.lr, beta1=c.betas[0], rho=c.rho,
                           eps=c.eps, weight_decay=c.weight_decay)

    def due_groups(self) -> list[int]:
        """Indices of the param groups whose estimate is due before the upcoming step t: t mod k = 1 with the
        group's own k (Algorithm 3, line 7), i.e. steps taken ≡ 0 (mod k)."""
        due = []
        for index, group in enumerate(self.param_groups):
            k = self.group_config(group).k
            steps = max((self.state[p].get("step", 0) for p in group["params"] if p in self.state), default=0)
            if steps % k == 0:
                due.append(index)
        return due

    def hessian_due(self) -> bool:
        """True when some param group's estimate is due (:meth:`due_groups`)."""
        return bool(self.due_groups())

    def accumulate_hessian(self, estimates: Mapping[Tensor, Tensor | None]) -> None:
        """Fold per-parameter estimates ĥ into h ← β2·h + (1−β2)·ĥ (parameters missing or ``None`` keep h)."""
        with torch.no_grad():
            for group in self.param_groups:
                beta2 = self.group_config(group).betas[1]
                for p in group["params"]:
                    est = estimates.get(p)
                    if est is not None:
                        hessian_ema_(self._state(p)["hessian"], est, beta2)

    def update_hessian(self, model: nn.Module, batch: Any,
                       loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                       logits_fn: Callable[[nn.Module, Any], Tensor] | None = None, *,
                       estimator: str | None = None, generator: torch.Generator | None = None,
                       groups: Sequence[int] | None = None) -> None:
        """Estimate ĥ on ``batch`` with the configured estimator and fold it into h (``.grad`` untouched).

        ``groups`` (indices into ``param_groups``) says whose h to refresh; by default the groups that are due
        (:meth:`due_groups`: with different k per group, each keeps its own period), or every group when none
        is due (an explicit refresh). Only those groups' parameters are differentiated."""
        if groups is None:
            groups = self.due_groups() or range(len(self.param_groups))
        chosen = [self.param_groups[i] for i in groups]
        params = [p for g in chosen for p in g["params"] if p.requires_grad]
        if not params:
            return
        names = {self.group_config(g).estimator for g in chosen}
        name = estimator or (names.pop() if len(names) == 1 else None)
        if name not in ESTIMATORS:
            raise ConfigError(f"Sophia: estimator must be one of {', '.join(ESTIMATORS)} (one per optimizer); "
                              f"got {estimator or sorted(names)}")
        sharded = isinstance(params[0], _dtensor_type())
        if sharded and name != "gnb":
            raise ConfigError("Sophia on FSDP2's sharded parameters takes the gnb estimator: Hutchinson needs a "
                              "double backward, which FSDP2's backward does not give (--set estimator=gnb; in "
                              "Python estimator='gnb')")
        if sharded:
            ests = gnb_estimate_sharded(params, model, batch, logits_fn, generator=generator)
        elif name == "gnb":
            ests = gnb_estimate(params, model, batch, logits_fn, generator=generator)
        else:
            ests = hutchinson_estimate(params, model, batch, loss_fn, generator=generator)
        if all(e is None for e in ests):  # else the estimate would silently never run: h stays 0
            raise ConfigError("Sophia's Hessian estimate reached none of its parameters: the logits_fn/loss_fn "
                              "given to hessian_step must run the very model the optimizer updates, with grad "
                              "enabled (not a copy, not under torch.no_grad)")
        ests = mean_over_replicas(model, params, ests)
        self.accumulate_hessian({p: e for p, e in zip(params, ests) if e is not None})


def _dtensor_type() -> type:
    """torch's DTensor class, or a class nothing is an instance of where it was never imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", type(None)) if module is not None else type(None)


def mean_over_replicas(model: nn.Module, params: Sequence[Tensor],
                       estimates: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Under DistributedDataParallel (``model`` is the DDP-wrapped module) each parameter's estimate averaged
    over the replicas, as DDP averages gradients: each rank estimates on its own batch, and without the average
    the replicas' Hessian EMAs, and then their weights, drift apart. A parameter without an estimate on some
    rank keeps its h on every rank. Outside DDP the estimates are returned as they are."""
    group = replica_group(model, "Sophia's Hessian estimate")
    if group is None or not params:
        return list(estimates)
    world = torch.distributed.get_world_size(group)
    device = params[0].device
    counts = torch.tensor([float(e is not None) for e in estimates], device=device)
    flat = torch.cat([(e.float() if e is not None else torch.zeros_like(p, dtype=torch.float32)).reshape(-1)
                      for p, e in zip(params, estimates)])
    torch.distributed.all_reduce(counts, group=group)
    torch.distributed.all_reduce(flat, group=group)
    out: list[Tensor | None] = []
    offset = 0
    for p, e, c in zip(params, estimates, counts.tolist()):
        chunk = flat[offset:offset + p.numel()]
        offset += p.numel()
        out.append(chunk.div_(world).view_as(p).to(e.dtype) if e is not None and c == world else None)
    return out


def sophia_parts(optimizer: torch.optim.Optimizer) -> list[Sophia]:
    """The :class:`Sophia` optimizers inside ``optimizer`` (itself, or parts of a :class:`Routed`)."""
    parts = optimizer.parts if isinstance(optimizer, Routed) else [optimizer]
    return [p for p in parts if isinstance(p, Sophia)]


def hessian_step(optimizer: torch.optim.Optimizer, model: nn.Module, batch: Any,
                 loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                 logits_fn: Callable[[nn.Module, Any], Tensor] | None = None, *,
                 generator: torch.Generator | None = None) -> bool:
    """The training-loop hook: call every step after ``backward`` and before ``step``.

    Refreshes the Hessian EMA of every Sophia part that is due (every k steps); returns whether it ran.
    A no-op returning False for optimizers without a Sophia part.
    """
    ran = False
    for part in sophia_parts(optimizer):
        due = part.due_groups()
        if due:
            part.update_hessian(model, batch, loss_fn, logits_fn, generator=generator, groups=due)
            ran = True
    return ran


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """m and h of the parameter's shape: 2·n·itemsize (the step is a Python int)."""
    n = 1
    for s in shape:
        n *= s
    return 2 * n * itemsize(dtype)


def step_flops(shape: tuple[int, ...], config: Config) -> StepFlops:
    """No matmul in the step; the estimate every k steps is a model-level cost (see :func:`estimate_passes`)."""
    return StepFlops(every=config.k)


MAX_PERIODS = 12
"""Most distinct k in one Sophia optimizer that :func:`estimate_shares` takes (2^12 subsets)."""


def estimate_shares(periods: Sequence[int]) -> dict[frozenset[int], Fraction]:
    """For param groups with estimate periods ``periods`` (their k) that step together: the share of steps on
    which exactly the groups in each set (indices into ``periods``) re-estimate.

    Group i re-estimates before the steps t with t mod k_i = 1, so the pattern repeats every lcm(k) steps and
    the shares are exact fractions (inclusion–exclusion over the distinct periods: the share on which exactly
    the periods D are due is Σ over T ⊇ D of (−1)^|T∖D| / lcm(T))."""
    distinct = sorted(set(periods))
    if len(distinct) > MAX_PERIODS:
        raise ConfigError(f"Sophia: {len(distinct)} different k in one optimizer; at most {MAX_PERIODS}")
    m = len(distinct)
    shares: dict[frozenset[int], Fraction] = {}
    for mask in range(1, 1 << m):
        share = Fraction(0)
        for sup in range(mask, 1 << m):
            if sup & mask == mask:
                chosen = [distinct[i] for i in range(m) if sup >> i & 1]
                sign = -1 if (bin(sup).count("1") - bin(mask).count("1")) % 2 else 1
                share += Fraction(sign, math.lcm(*chosen))
        if share:
            due = {distinct[i] for i in range(m) if mask >> i & 1}
            shares[frozenset(g for g, k in enumerate(periods) if k in due)] = share
    return shares


def estimate_passes(configs: Sequence[Config]) -> tuple[float, float]:
    """(Extra forward+backward passes per step, amortized; passes on a step that estimates) of one Sophia
    optimizer whose param groups have ``configs``: :data:`HESSIAN_PASSES` for its estimator, on the share of
    steps where some group is due (:func:`estimate_shares`). Where a model can run, :mod:`precondtune.flops`
    counts each estimate with ``FlopCounterMode`` instead (a pass over some of the parameters costs less)."""
    if not configs:
        return 0.0, 0.0
    passes = max(HESSIAN_PASSES[c.estimator] for c in configs)
    return float(passes * sum(estimate_shares([c.k for c in configs]).values())), passes


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log, around base), ρ ∈ [0.01, 0.1] (log; README range), k ∈ [2, 20] (log), weight decay ∈ [0, 0.4]."""
    b = base or Config()
    lr = _space.suggest_lr(trial, Config.lr, base, low=1e-4, high=1e-2)
    rho = trial.suggest_float("rho", 0.01, 0.1, log=True)
    k = trial.suggest_int("k", 2, 20, log=True)
    wd = trial.suggest_float("weight_decay", 0.0, 0.4)
    return Config(lr=lr, betas=b.betas, rho=rho, eps=b.eps, weight_decay=wd, k=k, estimator=b.estimator)


def from_adamw(*, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.01, **_: Any) -> Transfer:
    """lr = AdamW's, weight decay = 2× AdamW's, ρ = 0.05, betas = (0.965, 0.99) (Sophia's own, not AdamW's)."""
    config = Config(lr=lr, betas=Config.betas, rho=0.05, weight_decay=2 * weight_decay)
    return Transfer(config, "lr = lr_adamw, weight_decay = 2·wd_adamw, rho = 0.05, betas = (0.965, 0.99)",
                    "Sophia README, 'Hyper-parameter Tuning' (github.com/Liuhong99/Sophia): lr about AdamW's, "
                    "about 2x AdamW's weight decay; GPT-2 table rho = 0.05")


SPEC = OptimizerSpec(
    name="sophia", family="diagonal (Hessian)", paper="Liu et al. 2023, arXiv 2305.14342",
    config_cls=Config, optimizer_cls=Sophia, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw, state_formula="2·n (m, h)", refresh_knobs=("k",),
    roles=ALL_ROLES, elementwise=True,
    notes="Hessian estimate every k steps: one extra forward+backward (GNB) or about three (Hutchinson); "
          "call sophia.hessian_step(opt, model, batch, loss_fn, logits_fn) each step",
)
