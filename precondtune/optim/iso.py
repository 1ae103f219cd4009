"""Iso and IsoAdam: full-matrix preconditioning by input and output-gradient covariances (Jackson, arXiv 2307.12979).

For an ``nn.Linear`` with weight W ∈ ℝ^{out×in}, inputs X ∈ ℝ^{N×in} and output gradients G ∈ ℝ^{N×out}
(N = rows of the batch, all micro-batches of a step summed), so that ∇W = Gᵀ·X:

    A ← β_c·A + (1−β_c)·XᵀX,   B ← β_c·B + (1−β_c)·GᵀG                (captured by module hooks)
    every f steps:  L = (Â + δ·λ_max(Â)·I)^{-1/2},  R = (B̂ + δ·λ_max(B̂)·I)^{-1/2}   (Â = A/(1−β_cᵗ), eigh)
    P = R·∇W·L                                                            (the isometric gradient)
    Iso:      m ← β1·m + (1−β1)·P;  W ← W·(1 − lr·wd) − lr·m/(1−β1ᵗ)
    IsoAdam:  Adam on P (m, v, bias correction, ε);  W ← W·(1 − lr·wd) − lr·m̂/(√v̂ + ε)

With un-normalised XᵀX and GᵀG, P = (XᵀX)^{-1/2}·XᵀG·(GᵀG)^{-1/2} (transposed to W's layout) is invariant to
any invertible linear map of the layer's inputs or outputs, to the loss scale and to the batch size — the
paper's L_X = (AᵀXᵀXA)^{-1/2}, R_G = (BᵀGᵀGB)^{-1/2}; its spectral norm is at most 1 (exactly when the
roots come from the step's own batch; approximately with EMAs and roots refreshed every f steps), hence Iso's
Muon-like default learning rate. IsoAdam normalises P elementwise as Adam does, so AdamW's lr, betas, eps and
weight decay transfer (the paper's Algorithm 2). The damping δ is relative to the largest eigenvalue, which
keeps that invariance and bounds by δ^{-1/2} how much a stale root (refreshed every f steps) can amplify a
direction the covariance had not seen: output-gradient covariances are far from full rank (a 10-class head
gives rank ≲ 10 per example); on examples/mlp.py a damping of 1e-4 of the mean eigenvalue diverged at
lr 0.005–0.02 with f = 10, while δ = 1e-2 of λ_max trains. The eigen-solve runs in float32 on the
symmetrised matrix (float64 if it fails).

What comes from the paper and what does not. The paper's full text (its Algorithms 1 and 2) could not be read
for this module, and no public code by its author was found; what was checked: the abstract (the update's norm
is invariant to any linear map of the layer's inputs and outputs; IsoAdam lets Adam's hyperparameters transfer),
the opening of §1 (a layer W ∈ ℝ^{n×m} with y = Wᵀx, so the paper's gradient is XᵀG, the transpose of
``nn.Linear``'s ∇W = GᵀX used here), and a summary of the paper (source document 001: the preconditioner
L_X = (AᵀXᵀXA)^{-1/2}, R_G = (BᵀGᵀGB)^{-1/2} of §2.2; IsoAdam, §4.1 / Algorithm 2, scales the preconditioned
gradient elementwise as Adam does). Everything else is precondtune's documented choice, NOT taken from the
paper: the covariance EMAs (cov_beta) and their bias correction, Iso's momentum and its bias correction, the
damping δ = 1e-2·λ_max, the refresh period, the eigendecomposition, Iso's default lr 0.02 (Muon's public
default, chosen because ‖P‖₂ ≤ 1 as for Muon's update) and the exact form of IsoAdam's Adam step (Adam's m, v,
bias correction and ε applied to P, as written above).

Only ``matrix``-role ``nn.Linear`` weights are preconditioned; everything else goes to AdamW by default. The
output head is left to AdamW: its out×out covariance is vocab² (2.5·10⁹ entries at a 50k vocabulary), and
a head tied to the embedding gets gradient from the embedding lookup that the Linear's hooks never see.
A 2-D weight that is not an ``nn.Linear``'s, or a Linear whose ``forward`` is bypassed (e.g. the projections
inside ``nn.MultiheadAttention``), cannot be observed: a ConfigError says to route it to adamw.

Hooks: a forward hook on each Linear registers a gradient hook on its output that captures (X, G) during
backward, so only forward passes that are back-propagated count (an eval forward with grad enabled does
not). The hooks hold only a weak reference to the optimizer and are removed when it is garbage-collected
(or by :meth:`remove_hooks`). Their cost, 2·N·(in² + out²) FLOPs per layer and step, is spent inside
backward, not in ``step()``: see :func:`capture_flops`. All statistics live in ``optimizer.state[W]``
(``cov_in``, ``cov_out``, ``root_in``, ``root_out``, ``exp_avg`` [, ``exp_avg_sq``]) and are checkpointed.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..dtypes import itemsize
from ..errors import ConfigError
from . import _space
from ._replicas import average_over, replica_group
from .kernels import adam, add_scaled_, lerp_
from .registry import OptimizerSpec, PrecondOptimizer, StepFlops, Transfer, check_range

EIGH_FLOPS_N3 = 9
"""Symmetric eigendecomposition with eigenvectors by the symmetric QR algorithm: about 9·n³ flops
(Golub & Van Loan, Matrix Computations, 3rd ed., §8.3.3, Algorithm 8.3.3 and the count after it)."""


def _check_common(c: Any) -> None:
    check_range("lr", c.lr, c.lr >= 0, ">= 0 (0 lets a scheduler warm up from zero)")
    check_range("cov_beta", c.cov_beta, 0 <= c.cov_beta < 1, "[0, 1)")
    check_range("damping", c.damping, c.damping > 0, "> 0")
    check_range("weight_decay", c.weight_decay, c.weight_decay >= 0, ">= 0")
    check_range("precondition_frequency", c.precondition_frequency,
                isinstance(c.precondition_frequency, int) and c.precondition_frequency >= 1, "an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Iso hyperparameters (momentum on the isometric gradient P, whose spectral norm is at most 1)."""

    lr: float = 0.02
    """Learning rate; the update's spectral norm is at most lr. 0.02 is Muon's public default, a precondtune
    choice (the paper's value for Iso was not available)."""
    momentum: float = 0.9
    """EMA coefficient of P (with bias correction): precondtune's choice, not from the paper."""
    cov_beta: float = 0.95
    """EMA coefficient of the input and output-gradient covariances (bias-corrected): precondtune's choice."""
    damping: float = 1e-2
    """δ: the covariances get δ·λ_max·I before the inverse square root (scale-free): precondtune's choice."""
    weight_decay: float = 0.0
    """Decoupled weight decay W ← W·(1 − lr·wd)."""
    precondition_frequency: int = 10
    """Recompute the inverse square roots every f steps (always on the first): precondtune's choice."""

    def __post_init__(self) -> None:
        _check_common(self)
        check_range("momentum", self.momentum, 0 <= self.momentum < 1, "[0, 1)")


@dataclass(frozen=True, kw_only=True)
class AdamConfig:
    """IsoAdam hyperparameters: AdamW's (``torch.optim.AdamW`` defaults) plus the covariance knobs."""

    lr: float = 1e-3
    """Learning rate (transfers from AdamW)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's EMA coefficients of P and P²."""
    eps: float = 1e-8
    """Added to √v̂."""
    weight_decay: float = 0.01
    """Decoupled weight decay W ← W·(1 − lr·wd)."""
    cov_beta: float = 0.95
    """EMA coefficient of the input and output-gradient covariances (bias-corrected): precondtune's choice."""
    damping: float = 1e-2
    """δ: the covariances get δ·λ_max·I before the inverse square root (scale-free): precondtune's choice."""
    precondition_frequency: int = 10
    """Recompute the inverse square roots every f steps (always on the first): precondtune's choice."""

    def __post_init__(self) -> None:
        _check_common(self)
        check_range("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "two values in [0, 1)")
        check_range("eps", self.eps, self.eps >= 0, ">= 0")


def inverse_root(cov: Tensor, bias_correction: float, damping: float) -> Tensor:
    """(C/bc + δ·λ_max·I)^{-1/2} by a symmetric eigendecomposition (float32; float64 if that fails)."""
    c = cov.float() / bias_correction
    c = (c + c.mT) / 2
    try:
        evals, evecs = torch.linalg.eigh(c)
    except RuntimeError:  # eigh did not converge in float32: retry in float64
        evals, evecs = torch.linalg.eigh(c.double())
        evals, evecs = evals.float(), evecs.float()
    evals = evals.clamp_min(0)
    # a tensor, not float(): a graph break here made a compiled step resume its loop over parameters with the
    # wrong state (tests/test_compile.py)
    shift = damping * evals[-1].clamp_min(torch.finfo(torch.float32).tiny)
    d = (evals + shift).rsqrt()
    return (evecs * d) @ evecs.mT


def isometric_gradient(grad: Tensor, root_out: Tensor, root_in: Tensor) -> Tensor:
    """P = R·∇W·L (2·out²·in + 2·out·in² FLOPs)."""
    return (root_out @ grad) @ root_in


def _forward_hook(ref: weakref.ref, weight: Tensor, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    if not torch.is_grad_enabled() or not args or not torch.is_tensor(output) or not output.requires_grad:
        return
    if ref() is None:
        return
    output.register_hook(functools.partial(_grad_hook, ref, weight, args[0]))


def _grad_hook(ref: weakref.ref, weight: Tensor, x: Tensor, grad: Tensor) -> None:
    opt = ref()
    if opt is not None:
        opt._capture(weight, x, grad)


def _remove(handles: list[Any]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class _IsoBase(PrecondOptimizer):
    """Shared machinery: hooks, covariance capture and the refresh of the inverse roots."""

    def __init__(self, params: Iterable[Any], model: nn.Module | None = None, **hyperparameters: Any) -> None:
        super().__init__(params, **hyperparameters)
        name = type(self).__name__
        if model is None:
            registered = "iso-adam" if isinstance(self, IsoAdam) else "iso"
            raise ConfigError(f"{name} preconditions nn.Linear weights with statistics captured by module hooks, "
                              f"so it needs the model: precondtune.optim.build('{registered}', model) rather than "
                              "bare parameters or param groups")
        self._replicas = replica_group(model, name)
        linears: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            if isinstance(module, nn.Linear):
                linears.setdefault(id(module.weight), []).append(module)
        self._group_index: dict[Tensor, int] = {}  # an index, not the dict: load_state_dict replaces the groups
        self._names: dict[Tensor, str] = {}
        self._handles: list[Any] = []
        ref = weakref.ref(self)
        for index, group in enumerate(self.param_groups):
            names = group.get("names") or [f"param{k}" for k in range(len(group["params"]))]
            for p, pname in zip(group["params"], names):
                self._group_index[p], self._names[p] = index, pname
                if id(p) not in linears:
                    raise ConfigError(f"{name} can only precondition nn.Linear weights; {pname} (shape "
                                      f"{tuple(p.shape)}) is not one: route it to adamw, e.g. "
                                      f"routing=[{{'match': 'matrix', 'name': '{pname}', 'optimizer': 'adamw'}}]")
                for module in linears[id(p)]:
                    self._handles.append(module.register_forward_hook(functools.partial(_forward_hook, ref, p)))
        self._finalizer = weakref.finalize(self, _remove, self._handles)

    def remove_hooks(self) -> None:
        """Detach the covariance hooks from the model (also done when the optimizer is garbage-collected)."""
        self._finalizer()

    def _state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            out, inp = p.shape
            kw = {"dtype": p.dtype, "device": p.device}
            state["step"] = 0
            state["cov_updates"] = 0
            state["captured"] = False
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self._adam:
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["cov_in"] = torch.zeros((inp, inp), **kw)
            state["cov_out"] = torch.zeros((out, out), **kw)
            state["root_in"] = torch.eye(inp, **kw)
            state["root_out"] = torch.eye(out, **kw)
        return state

    _adam = False

    @torch.no_grad()
    def _capture(self, p: Tensor, x: Tensor, grad: Tensor) -> None:
        """Fold one (X, G) pair into the covariance EMAs (the decay is applied once per step)."""
        index = self._group_index.get(p)
        if index is None:  # a hook copied along with the module (copy.deepcopy(model)): not ours
            return
        beta = self.group_config(self.param_groups[index]).cov_beta
        state = self._state(p)
        if not state["captured"]:
            state["cov_in"].mul_(beta)
            state["cov_out"].mul_(beta)
            state["cov_updates"] += 1
            state["captured"] = True
        xs = x.detach().reshape(-1, p.shape[1]).to(p.dtype)
        gs = grad.reshape(-1, p.shape[0]).to(p.dtype)
        # out-of-place products (not addmm_) so that FlopCounterMode, which does not count in-place addmm_, sees them
        add_scaled_(state["cov_in"], xs.mT @ xs, 1 - beta)
        add_scaled_(state["cov_out"], gs.mT @ gs, 1 - beta)

    def _precondition(self, p: Tensor, c: Any) -> tuple[dict[str, Any], Tensor]:
        state = self._state(p)
        if not state["captured"]:
            raise ConfigError(
                f"{type(self).__name__}: no inputs/output gradients were captured for {self._names[p]} this step "
                "(its nn.Linear forward was bypassed, e.g. inside nn.MultiheadAttention, or the forward ran "
                "under torch.no_grad); route it to adamw, e.g. routing=[{'match': 'matrix', 'name': "
                f"'{self._names[p]}', 'optimizer': 'adamw'}}]")
        state["step"] += 1
        if (state["step"] - 1) % c.precondition_frequency == 0:
            if self._replicas is not None:  # DDP: the EMA of the replicas' mean statistics (the EMA is linear)
                average_over(self._replicas, state["cov_in"], state["cov_out"])
            bc = 1 - c.cov_beta ** state["cov_updates"]
            state["root_in"].copy_(inverse_root(state["cov_in"], bc, c.damping))
            state["root_out"].copy_(inverse_root(state["cov_out"], bc, c.damping))
        return state, isometric_gradient(p.grad, state["root_out"], state["root_in"])

    def _step_group(self, group: dict[str, Any], c: Any) -> None:
        for p in self._params_with_grad(group):
            state, pg = self._precondition(p, c)
            self._apply(p, pg, state, c)
        for p in group["params"]:
            if p in self.state:
                self.state[p]["captured"] = False

    def _apply(self, p: Tensor, pg: Tensor, state: dict[str, Any], c: Any) -> None:  # pragma: no cover
        raise NotImplementedError


class Iso(_IsoBase):
    """Iso: momentum on the isometric gradient (see the module docstring)."""

    Config = Config

    def _apply(self, p: Tensor, pg: Tensor, state: dict[str, Any], c: Config) -> None:
        lerp_(state["exp_avg"], pg, 1 - c.momentum)
        adam.decay_(p, c.lr, c.weight_decay)
        p.add_(state["exp_avg"], alpha=-c.lr / (1 - c.momentum ** state["step"]))


class IsoAdam(_IsoBase):
    """IsoAdam: Adam's elementwise scaling applied to the isometric gradient (paper's Algorithm 2)."""

    Config = AdamConfig
    _adam = True

    def _apply(self, p: Tensor, pg: Tensor, state: dict[str, Any], c: AdamConfig) -> None:
        adam.update_moments_(state["exp_avg"], state["exp_avg_sq"], pg, *c.betas)
        direction = adam.direction(state["exp_avg"], state["exp_avg_sq"], state["step"], *c.betas, c.eps)
        adam.decay_(p, c.lr, c.weight_decay)
        p.add_(direction, alpha=-c.lr)


def _make(cls: type[_IsoBase]) -> Any:
    def make(groups: list[dict[str, Any]], model: nn.Module | None, **hp: Any) -> torch.optim.Optimizer:
        return cls(groups, model=model, **hp)

    return make


def _state_bytes(moments: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    out, inp = shape
    return (moments * out * inp + 2 * inp * inp + 2 * out * out) * itemsize(dtype)


def state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: Config, info: Any = None) -> int:
    """m (out·in), the two covariances and their inverse roots (2·in² + 2·out²), times itemsize."""
    return _state_bytes(1, shape, dtype)


def adam_state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: AdamConfig, info: Any = None) -> int:
    """m and v (2·out·in), the two covariances and their inverse roots (2·in² + 2·out²), times itemsize."""
    return _state_bytes(2, shape, dtype)


def step_flops(shape: tuple[int, ...], config: Config | AdamConfig) -> StepFlops:
    """P = R·∇W·L every step; on a refresh two eighs (9n³ each) and two root rebuilds V·diag·Vᵀ (2n³ each)."""
    out, inp = shape
    return StepFlops(matmul=2 * out * out * inp + 2 * out * inp * inp,
                     refresh_matmul=2 * inp**3 + 2 * out**3,
                     refresh_other=EIGH_FLOPS_N3 * (inp**3 + out**3),
                     every=config.precondition_frequency)


def capture_flops(shape: tuple[int, ...], tokens: int) -> int:
    """FLOPs the hooks spend inside backward per step for one layer: XᵀX and GᵀG, 2·N·(in² + out²)."""
    out, inp = shape
    return 2 * tokens * (inp * inp + out * out)


def _suggest_cov(trial: Any) -> tuple[float, int]:
    cov_beta = _space.suggest_beta(trial, "cov_beta", 0.8, 0.99)
    freq = trial.suggest_categorical("precondition_frequency", [1, 5, 10, 25, 50])
    return cov_beta, freq


def search_space(trial: Any, base: Config | None = None) -> Config:
    """lr (log, around base), momentum ∈ [0.8, 0.98], covariance β ∈ [0.8, 0.99], f ∈ {1, 5, 10, 25, 50}."""
    b = base or Config()
    lr = _space.suggest_lr(trial, Config.lr, base, low=1e-3, high=0.2)
    momentum = _space.suggest_beta(trial, "momentum", 0.8, 0.98)
    cov_beta, freq = _suggest_cov(trial)
    return Config(lr=lr, momentum=momentum, cov_beta=cov_beta, damping=b.damping, weight_decay=b.weight_decay,
                  precondition_frequency=freq)


def adam_search_space(trial: Any, base: AdamConfig | None = None) -> AdamConfig:
    """AdamW's lr (log, around base) and β1, plus covariance β ∈ [0.8, 0.99] and f ∈ {1, 5, 10, 25, 50}."""
    b = base or AdamConfig()
    lr = _space.suggest_lr(trial, AdamConfig.lr, base, low=1e-4, high=3e-2)
    b1 = _space.suggest_beta(trial, "beta1", 0.8, 0.98)
    cov_beta, freq = _suggest_cov(trial)
    return AdamConfig(lr=lr, betas=(b1, b.betas[1]), eps=b.eps, weight_decay=b.weight_decay, cov_beta=cov_beta,
                      damping=b.damping, precondition_frequency=freq)


def from_adamw(*, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.01, **_: Any) -> Transfer:
    """Iso has no Adam normalisation: AdamW's β1 and weight decay carry over, the lr is Iso's own default."""
    config = Config(momentum=betas[0], weight_decay=weight_decay)
    return Transfer(config, "momentum = β1, weight_decay = wd of AdamW; lr = 0.02 (not transferable: the update "
                    "is spectrally normalised, not elementwise)",
                    "Jackson, arXiv 2307.12979, Sec. 4.1: only IsoAdam is designed to take Adam's hyperparameters")


def adam_from_adamw(*, lr: float, betas: tuple[float, float] = AdamConfig.betas, eps: float = AdamConfig.eps,
                    weight_decay: float = AdamConfig.weight_decay, **_: Any) -> Transfer:
    """Identity: IsoAdam reuses AdamW's lr, betas, eps and weight decay."""
    return Transfer(AdamConfig(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), "identity",
                    "Jackson, arXiv 2307.12979, Sec. 4.1: IsoAdam lets Adam's optimal hyperparameters transfer")


def _is_linear(info: Any) -> bool:
    """Iso preconditions nn.Linear weights only (its statistics come from the layer's hooks)."""
    return bool(info.extra.get("linear"))


SPEC = OptimizerSpec(
    name="iso", family="full-matrix (Kronecker, activations)", paper="Jackson 2023, arXiv 2307.12979",
    config_cls=Config, optimizer_cls=Iso, state_bytes=state_bytes, step_flops=step_flops,
    search_space=search_space, from_adamw=from_adamw,
    state_formula="out·in (m) + 2·in² + 2·out² (covariances, inverse roots)",
    refresh_knobs=("precondition_frequency",), roles=frozenset({"matrix"}), make=_make(Iso), accepts=_is_linear,
    every_step_refresh={"precondition_frequency": 1},
    notes="nn.Linear weights only (hooks); other matrices, head, embeddings, vectors and convs go to AdamW; hooks cost "
          "2·N·(in² + out²) FLOPs per layer inside backward",
)

ADAM_SPEC = OptimizerSpec(
    name="iso-adam", family="full-matrix (Kronecker, activations) + Adam", paper="Jackson 2023, arXiv 2307.12979",
    config_cls=AdamConfig, optimizer_cls=IsoAdam, state_bytes=adam_state_bytes, step_flops=step_flops,
    search_space=adam_search_space, from_adamw=adam_from_adamw,
    state_formula="2·out·in (m, v) + 2·in² + 2·out² (covariances, inverse roots)",
    refresh_knobs=("precondition_frequency",), roles=frozenset({"matrix"}), make=_make(IsoAdam),
    every_step_refresh={"precondition_frequency": 1},
    aliases=("isoadam",), accepts=_is_linear,
    notes="nn.Linear weights only (hooks); other matrices, head, embeddings, vectors and convs go to AdamW; hooks cost "
          "2·N·(in² + out²) FLOPs per layer inside backward",
)
