"""The one optimizer registry: ``name -> OptimizerSpec``, and the shared base every bundled optimizer uses.

An optimizer module under ``precondtune/optim/`` defines ``SPEC = OptimizerSpec(...)``; the registry finds
every such module itself, so adding an optimizer is adding its module. Names are case-insensitive and ignore
``-``/``_``/``+`` (``adam-mini``, ``AdamMini`` and ``adam_mini`` are one optimizer; ``adadiag++`` is ``adadiag-pp``).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import numbers
import pkgutil
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    import optuna

    from ..inventory import ParamInfo

ALL_ROLES = frozenset({"matrix", "embedding", "head", "vector", "conv", "batched"})
MATRIX_ROLES = frozenset({"matrix", "conv"})
"""Roles a matrix-only optimizer updates by default (public practice: Muon on hidden matrices and flattened
convs; AdamW for embeddings, the head and vectors — Keller Jordan's Muon README, Moonlight 2502.16982)."""

CANONICAL_ORDER = (
    "adamw", "adafactor", "adam-mini", "shampoo", "soap", "muon", "sophia", "iso", "iso-adam",
    "adadiag", "adadiag-pp", "adafac-diag", "hfac", "hfac-diag", "galore",
)


def normalize(name: str) -> str:
    """The lookup key of a name: lower case, ``++`` -> ``pp``, without ``-``/``_``/spaces."""
    return re.sub(r"[-_\s]", "", name.strip().lower().replace("++", "pp").replace("+", "p"))


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step for one parameter.

    ``matmul`` is what ``torch.utils.flop_counter.FlopCounterMode`` counts on an ordinary step;
    ``refresh_matmul`` the extra matmul FLOPs on a refresh step (also counted by FlopCounterMode);
    ``refresh_other`` documented operation counts of decompositions (eigh, QR, SVD) FlopCounterMode does not
    count; ``every`` the refresh period in steps (0: never refreshes).
    """

    matmul: int = 0
    refresh_matmul: int = 0
    refresh_other: int = 0
    every: int = 0

    @property
    def refresh(self) -> int:
        return self.refresh_matmul + self.refresh_other

    @property
    def amortized(self) -> float:
        """Per-step FLOPs with refreshes spread over their period."""
        return self.matmul + (self.refresh / self.every if self.every else 0.0)


@dataclass(frozen=True)
class Transfer:
    """A config transferred from a tuned AdamW, with the rule in one line and its source."""

    config: Any
    rule: str
    source: str


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything precondtune knows about one optimizer (STYLE.md: all of it lives in the optimizer's module).

    ``state_bytes(shape, dtype, config, info)`` is exact: it equals the bytes the optimizer keeps in
    ``optimizer.state`` for one parameter of that shape and dtype (``info`` carries the role and structure,
    e.g. attention heads, for optimizers whose state depends on them). ``step_flops(shape, config)`` gives
    :class:`StepFlops`. ``search_space(trial)`` returns a Config (Optuna's define-by-run idiom).
    ``from_adamw(lr=, betas=, eps=, weight_decay=)`` returns a :class:`Transfer`.
    """

    name: str
    family: str
    paper: str
    config_cls: type
    optimizer_cls: type[torch.optim.Optimizer]
    state_bytes: Callable[..., int]
    step_flops: Callable[..., StepFlops]
    search_space: Callable[[optuna.Trial], Any]
    from_adamw: Callable[..., Transfer]
    state_formula: str
    refresh_knobs: tuple[str, ...] = ()
    roles: frozenset[str] = ALL_ROLES
    aliases: tuple[str, ...] = ()
    make: Callable[..., torch.optim.Optimizer] | None = None
    """Optional ``make(groups, model, **hp) -> Optimizer`` for optimizers that need the model (hooks)."""
    notes: str = ""
    accepts: Callable[[ParamInfo], bool] | None = None
    """Optional predicate for parameters of a role the optimizer handles that it still cannot update (Iso: only
    ``nn.Linear`` weights); the default routing sends the others to AdamW, as it does other roles."""
    elementwise: bool = False
    """True when every update element depends only on the same element's gradient and state (AdamW, Sophia), so
    a sharded parameter updates in place; otherwise the update needs the whole matrix (or whole rows/columns)."""
    trial_params: Callable[[Any], dict[str, Any]] | None = None
    """Optional ``trial_params(config) -> {param: value}``: search-space params that do not share a Config field's
    name (Muon's ``ns_schedule``), so a warm start records the params that reproduce its config."""
    steady_state: Mapping[str, Any] = field(default_factory=dict)
    """Hyperparameters that skip a start-up phase whose steps are cheaper than the rest of a run (Shampoo's
    grafted-Adam steps before ``start_preconditioning_step``): step times are measured with them, so a
    measurement of a hundred steps times the steps a long run mostly takes."""
    every_step_refresh: Mapping[str, Any] = field(default_factory=dict)
    """Hyperparameters under which every step is a refresh step that also preconditions (Shampoo: frequency 1,
    preconditioning from step 1). The memory planner traces the step with them, because the two traced steps of
    the user's config may all come before a refresh, or refresh only from a fresh state; a refresh's transients
    do not depend on how often it runs, so this is the config's largest step."""

    def default_config(self) -> Any:
        return self.config_cls()

    def flops(self, info: ParamInfo, config: Any) -> StepFlops:
        """``step_flops(shape, config)``, passing ``info`` to optimizers whose count depends on the role
        (Muon counts a ``batched`` parameter as a stack of matrices, a conv kernel as one flattened matrix)."""
        if "info" in inspect.signature(self.step_flops).parameters:
            return self.step_flops(info.shape, config, info=info)
        return self.step_flops(info.shape, config)

    def config(self, **hyperparameters: Any) -> Any:
        """A validated Config; unknown keys name themselves and the valid ones."""
        return make_config(self.config_cls, hyperparameters, where=self.name)


def make_config(config_cls: type, hyperparameters: Mapping[str, Any], *, where: str) -> Any:
    """``config_cls(**hyperparameters)`` with unknown keys and bad values reported by name."""
    fields = _fields(config_cls)
    unknown = [k for k in hyperparameters if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown hyperparameter {unknown[0]!r}; valid: {', '.join(fields)}")
    hp = {k: _python(v) for k, v in hyperparameters.items()}
    for key, value in hp.items():
        problem = _type_problem(fields[key], key, value)
        if problem:
            raise ConfigError(f"{where}: {key}={value!r} {problem}")
    try:
        return config_cls(**hp)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _python(value: Any) -> Any:
    """Lists and numpy arrays -> tuples, numpy scalars -> Python numbers (what the Configs' own checks expect)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


@cache
def _fields(config_cls: type) -> dict[str, tuple[Any, bool]]:
    """A Config class's fields in order: name -> (default, whether the annotation admits None). Built once per
    class: a param group's config is validated at every step."""
    out = {}
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = (default, "None" in str(f.type))
    return out


def _type_problem(field_info: tuple[Any, bool], key: str, value: Any) -> str | None:
    """What is wrong with ``value``'s type for the field ``key`` (after :func:`_python`), judged by the field's
    default and whether its annotation admits None (``field_info``, from :func:`_fields`); None when nothing is
    (range checks are the Config's own). Accepted besides Python's own types: a 0-d tensor for a number (torch
    takes a tensor lr), inf for thresholds (``clip_threshold``, ``max_precond_dim``) but not for lr or weight
    decay, None for a bool (torch's "auto")."""
    default, admits_none = field_info
    if value is None:
        ok = default is None or isinstance(default, bool) or admits_none
        return None if ok else "must be set (it cannot be null)"
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not isinstance(default, (bool, tuple, str)):
        value = value.item()
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(default, int):
        if number and isinstance(value, float) and math.isinf(value) and value > 0:
            return None  # no limit (max_precond_dim)
        return None if isinstance(value, numbers.Integral) and number else "must be an integer"
    if isinstance(default, float):
        if not number:
            return "must be a number"
        return "must be finite" if key in _FINITE and not math.isfinite(value) else None
    if isinstance(default, tuple):
        return None if isinstance(value, tuple) else f"must be a list like {json.dumps(list(default))}"
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    return None


_FINITE = frozenset({"lr", "weight_decay"})
"""Numeric fields an infinite value makes meaningless (thresholds such as ``clip_threshold`` may be inf)."""


def config_dict(config: Any) -> dict[str, Any]:
    """A Config as a plain dict (tuples kept), for param groups and YAML."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def check_range(name: str, value: Any, ok: bool, allowed: str) -> None:
    """Config validation helper: raise ``ValueError`` naming the field and its allowed range."""
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")


def _validate(optimizer: Any, group: dict[str, Any]) -> Any:
    return optimizer._validated_config(group)


_eager_validate: Callable[[Any, dict[str, Any]], Any] | None = None
""":func:`_validate` under ``torch.compiler.disable``: made when the first optimizer is built, outside any compiled
code (dynamo is loaded by then: ``torch.optim.Optimizer`` imports it), so a compiled step only calls it."""


class PrecondOptimizer(torch.optim.Optimizer):
    """Base of the bundled optimizers: hyperparameters come from a frozen Config, validated per group.

    Subclasses set ``Config`` and implement ``_step_group(group, config)``. Sparse gradients are refused,
    parameters without gradients skipped, and ``step(closure)`` follows torch's convention.
    """

    Config: type
    runs_on_dtensor: bool = False
    """Runs on FSDP2's (or tensor parallelism's) sharded DTensor parameters: set only where a test has run the
    optimizer on them across processes and matched the unsharded run."""

    def __init__(self, params: Iterable[Any], **hyperparameters: Any) -> None:
        global _eager_validate
        if _eager_validate is None:
            _eager_validate = torch.compiler.disable(_validate)
        config = make_config(self.Config, hyperparameters, where=type(self).__name__)
        super().__init__(params, config_dict(config))
        for group in self.param_groups:
            self.group_config(group)  # validate per-group overrides now, not at the first step
        if not self.runs_on_dtensor:
            self._refuse_dtensors()

    def _refuse_dtensors(self) -> None:
        """A ConfigError at construction for a sharded DTensor parameter, instead of a mixed Tensor/DTensor
        error from inside the first step."""
        if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist
            return
        from torch.distributed.tensor import DTensor
        if any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"]):
            able = [n for n in available() if getattr(get_spec(n).optimizer_cls, "runs_on_dtensor", False)]
            raise ConfigError(
                f"{type(self).__name__} runs on whole (unsharded) parameters, and this model's are DTensors "
                f"(FSDP2's fully_shard or tensor parallelism); train it with DDP, or use one that runs sharded: "
                f"{', '.join(able)}")

    def _refuse_shapes(self, name: str, accepts: Callable[[torch.Tensor], bool], what: str) -> None:
        """At construction, not at the first step: a ConfigError for a parameter this optimizer cannot update
        (param groups given by hand skip the routing that sends such parameters to AdamW)."""
        for k, group in enumerate(self.param_groups):
            bad = next((p for p in group["params"] if not accepts(p)), None)
            if bad is not None:
                raise ConfigError(
                    f"{type(self).__name__} updates {what}; param group {k} holds a parameter of shape "
                    f"{tuple(bad.shape)}. Pass the model or a flat list of parameters "
                    f"(precondtune.optim.build('{name}', model)) and such parameters go to AdamW, or route them "
                    "with build(..., routing=[...])")

    def group_config(self, group: dict[str, Any]) -> Any:
        """The validated Config of one param group (group keys override the defaults). Inside a compiled
        ``opt.step()`` the validation runs eagerly, instead of guarding on every hyperparameter (which recompiles
        until dynamo's limit)."""
        if torch.compiler.is_compiling() and _eager_validate is not None:
            return _eager_validate(self, group)
        return self._validated_config(group)

    def _validated_config(self, group: dict[str, Any]) -> Any:
        return make_config(self.Config, {k: group[k] for k in _fields(self.Config) if k in group},
                           where=type(self).__name__)

    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ConfigError(f"{type(self).__name__} does not support sparse gradients; use dense gradients "
                                  "(e.g. nn.Embedding(sparse=False))")
            out.append(p)
        return out

    def _step_group(self, group: dict[str, Any], config: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group, self.group_config(group))
        return loss


class Routed(torch.optim.Optimizer):
    """Several bundled optimizers behind one ``torch.optim.Optimizer``, each owning some param groups.

    The parts share this optimizer's ``param_groups`` dicts and ``state``, so LR schedulers, ``zero_grad``,
    ``state_dict``/``load_state_dict`` and checkpointing see one optimizer.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        groups = [g for part in parts for g in part.param_groups]
        super().__init__(groups, defaults={})
        self.parts = parts
        self._relink()

    def _relink(self) -> None:
        k = 0
        for part in self.parts:
            n = len(part.param_groups)
            part.param_groups = self.param_groups[k:k + n]
            part.state = self.state
            k += n

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._relink()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def __repr__(self) -> str:
        return "Routed(" + ", ".join(type(p).__name__ for p in self.parts) + ")"


@cache
def _discover() -> dict[str, OptimizerSpec]:
    from .. import optim as package

    specs: dict[str, OptimizerSpec] = {}
    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name.startswith("_") or mod.name in {"registry", "routing", "kernels"}:
            continue
        module = importlib.import_module(f"{package.__name__}.{mod.name}")
        for value in vars(module).values():
            if isinstance(value, OptimizerSpec):
                specs[value.name] = value
    order = {n: k for k, n in enumerate(CANONICAL_ORDER)}
    return dict(sorted(specs.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def available() -> list[str]:
    """Canonical names of the bundled optimizers."""
    return list(_discover())


def specs() -> list[OptimizerSpec]:
    return list(_discover().values())


def get_spec(name: str) -> OptimizerSpec:
    """The spec of ``name`` (any spelling or alias); an unknown name lists the valid ones."""
    key = normalize(name)
    for spec in _discover().values():
        if key == normalize(spec.name) or key in {normalize(a) for a in spec.aliases}:
            return spec
    raise UnknownNameError("optimizer", name, available())


def resolve_names(names: str | Iterable[str]) -> list[str]:
    """``"all"`` / ``"muon,soap"`` / a list -> canonical names, unknown ones rejected with the valid list."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = list(names)
    if any(normalize(n) == "all" for n in names):
        return available()
    out: list[str] = []
    for n in names:
        canon = get_spec(n).name
        if canon not in out:
            out.append(canon)
    if not out:
        raise ConfigError(f"no optimizer given; pass --optimizer NAME[,NAME...] or all ({', '.join(available())})")
    return out


@dataclass(frozen=True)
class Rule:
    """One routing rule: parameters whose role full-matches ``match`` (and whose name contains a match of
    ``name``, if given) go to ``optimizer`` with ``hyperparameters``. Ordered; the first match wins."""

    match: str
    optimizer: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    def matches(self, info: ParamInfo) -> bool:
        if not re.fullmatch(self.match, info.role):
            return False
        return self.name is None or re.search(self.name, info.name) is not None
