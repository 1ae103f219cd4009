"""precondtune's bundled optimizers: registry, routing by parameter role, and ``build``.

>>> opt = precondtune.optim.build("muon", model, lr=0.02)   # Muon on hidden matrices, AdamW on the rest

Routing (SPEC.md): ordered rules, first match wins, matched against each parameter's role (and optionally its
name); a matrix-only optimizer sends the roles it does not handle to AdamW unless a rule says otherwise.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..inventory import ParamInfo, infos_for_params, inventory
from .registry import (
    ALL_ROLES,
    MATRIX_ROLES,
    OptimizerSpec,
    PrecondOptimizer,
    Routed,
    Rule,
    StepFlops,
    Transfer,
    available,
    check_range,
    config_dict,
    get_spec,
    make_config,
    normalize,
    resolve_names,
    specs,
)

__all__ = [
    "ALL_ROLES",
    "MATRIX_ROLES",
    "Assignment",
    "OptimizerSpec",
    "PrecondOptimizer",
    "Routed",
    "Rule",
    "StepFlops",
    "Transfer",
    "amortized_step_flops",
    "available",
    "build",
    "check_range",
    "config_dict",
    "default_routing",
    "get_spec",
    "make_config",
    "normalize",
    "resolve_names",
    "route",
    "specs",
    "state_bytes",
    "with_spec_overrides",
]


def with_spec_overrides(name: str, hyperparameters: Mapping[str, Any], routing: Any,
                        field: str) -> tuple[dict[str, Any], list[Rule] | None]:
    """``hyperparameters`` and ``routing`` with each optimizer's ``OptimizerSpec.<field>`` mapping laid over its
    own values: the main optimizer's over ``hyperparameters``, each rule's optimizer's (the main one for a rule
    naming none) over the rule's. Used to trace a refresh step (``every_step_refresh``) and to time the steady
    state (``steady_state``) whatever the user's config says."""
    hp = {**hyperparameters, **getattr(get_spec(name), field)}
    if not routing:
        return hp, routing
    rules = []
    for r in as_rules(routing):
        over = getattr(get_spec(r.optimizer or name), field)
        rules.append(replace(r, hyperparameters={**r.hyperparameters, **over}) if over else r)
    return hp, rules


def default_routing(spec: OptimizerSpec) -> list[Rule]:
    """The roles ``spec`` does not handle go to AdamW with its defaults (public practice for Muon & co.)."""
    other = [r for r in sorted(ALL_ROLES) if r not in spec.roles]
    return [Rule(match="|".join(other), optimizer="adamw")] if other else []


def as_rules(routing: Iterable[Rule | Mapping[str, Any]] | None) -> list[Rule]:
    """Rules from ``Rule`` objects or config-file dicts (``{match, optimizer, hyperparameters, name}``)."""
    out = []
    for k, r in enumerate(routing or []):
        if isinstance(r, Rule):
            out.append(r)
            continue
        unknown = set(r) - {"match", "optimizer", "hyperparameters", "name"}
        if unknown or "match" not in r:
            raise ConfigError(f"param_groups[{k}]: needs 'match' and may have 'optimizer', 'hyperparameters', "
                              f"'name'; got {sorted(r)}")
        out.append(Rule(match=str(r["match"]), optimizer=str(r.get("optimizer", "")),
                        hyperparameters=dict(r.get("hyperparameters") or {}), name=r.get("name")))
    return out


@dataclass(frozen=True)
class Assignment:
    """Which optimizer, with which validated Config, updates one parameter."""

    info: ParamInfo
    spec: OptimizerSpec
    config: Any
    overrides: tuple[tuple[str, Any], ...]


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def route(name: str, infos: list[ParamInfo], routing: Iterable[Rule | Mapping[str, Any]] | None = None,
          **hyperparameters: Any) -> list[Assignment]:
    """Decide, per parameter, the optimizer and Config: user rules first, then the default routing."""
    main = get_spec(name)
    main_config = main.config(**hyperparameters)
    user_rules = as_rules(routing)
    # what main cannot take goes to the AdamW the rules configure — the last rule naming AdamW for whole roles
    # (no name filter), as the fallback rule of a tuned AdamW is — else AdamW's defaults: with that rule, a matrix
    # Iso cannot hook keeps the tuned values too
    adamw_overrides = next((r.hyperparameters for r in reversed(user_rules) if r.optimizer and r.name is None
                            and get_spec(r.optimizer).name == "adamw"), {})
    rules = user_rules + default_routing(main)
    out = []
    for info in infos:
        spec, overrides = main, {}
        for rule in rules:
            if rule.matches(info):
                spec = get_spec(rule.optimizer) if rule.optimizer else main
                overrides = rule.hyperparameters
                break
        else:  # no rule names it: the default routing, where a parameter main cannot take goes to AdamW
            if main.accepts is not None and info.module_type and not main.accepts(info):  # (bare tensors: main)
                spec, overrides = get_spec("adamw"), adamw_overrides
        if info.role not in spec.roles:
            raise ConfigError(f"{spec.name} cannot update {info.name} (role {info.role}); route role "
                              f"{info.role!r} to another optimizer, e.g. adamw")
        if spec is main:
            config = main.config(**{**hyperparameters, **overrides}) if overrides else main_config
        else:
            config = spec.config(**overrides)
        frozen = tuple(sorted((k, _freeze(v)) for k, v in overrides.items()))
        out.append(Assignment(info, spec, config, frozen))
    return out


def build(name: str, model_or_params: nn.Module | Iterable[Any], *,
          routing: Iterable[Rule | Mapping[str, Any]] | None = None, **hyperparameters: Any) -> torch.optim.Optimizer:
    """A working ``torch.optim.Optimizer`` for ``model_or_params``, with roles routed (see module docstring).

    Given an ``nn.Module``, roles come from :func:`precondtune.inventory.inventory`; given tensors, from shape
    alone; given param-group dicts, the groups are passed to the optimizer as they are.
    """
    spec = get_spec(name)
    model = model_or_params if isinstance(model_or_params, nn.Module) else None
    if model is None:
        items = list(model_or_params)
        if items and isinstance(items[0], Mapping):
            return spec.optimizer_cls(items, **hyperparameters)
        infos = infos_for_params(p for p in items if p.requires_grad)
    else:
        infos = inventory(model)
    if not infos:
        raise ConfigError("the model has no trainable parameters; nothing to optimize")
    assignments = route(spec.name, infos, routing, **hyperparameters)
    by_spec: dict[str, dict[tuple, dict[str, Any]]] = {}
    for a in assignments:
        heads = a.info.extra.get("heads")
        key = (a.info.role, a.overrides, heads, a.info.extra.get("attention"))
        groups = by_spec.setdefault(a.spec.name, {})
        if key not in groups:
            g: dict[str, Any] = {"params": [], "names": [], "role": a.info.role, **dict(a.overrides)}
            if heads is not None:
                g["heads"], g["attention"] = heads, a.info.extra.get("attention")
            groups[key] = g
        groups[key]["params"].append(a.info.param)
        groups[key]["names"].append(a.info.name)
    parts = []
    for spec_name, groups in by_spec.items():
        part_spec = get_spec(spec_name)
        hp = hyperparameters if part_spec is spec else {}
        glist = list(groups.values())
        if part_spec.make is not None:
            parts.append(part_spec.make(glist, model, **hp))
        else:
            parts.append(part_spec.optimizer_cls(glist, **hp))
    return parts[0] if len(parts) == 1 else Routed(parts)


def state_bytes(name: str, model_or_infos: nn.Module | list[ParamInfo], *,
                routing: Iterable[Rule | Mapping[str, Any]] | None = None, state_dtype: torch.dtype | None = None,
                **hyperparameters: Any) -> int:
    """Exact bytes ``build(name, model, ...)`` keeps in ``optimizer.state`` once every parameter has stepped.

    ``state_dtype`` defaults to each parameter's dtype (as torch does).
    """
    infos = inventory(model_or_infos) if isinstance(model_or_infos, nn.Module) else model_or_infos
    total = 0
    for a in route(name, infos, routing, **hyperparameters):
        total += a.spec.state_bytes(a.info.shape, state_dtype or a.info.dtype, a.config, a.info)
    return total


def amortized_step_flops(name: str, model_or_infos: nn.Module | list[ParamInfo], *,
                         routing: Iterable[Rule | Mapping[str, Any]] | None = None, **hyperparameters: Any) -> float:
    """Optimizer FLOPs per step under the routing, each parameter's refreshes spread over its own period
    (``precondtune.flops`` adds hook and Hessian-estimate costs on top)."""
    infos = inventory(model_or_infos) if isinstance(model_or_infos, nn.Module) else model_or_infos
    return sum(a.spec.flops(a.info, a.config).amortized for a in route(name, infos, routing, **hyperparameters))
