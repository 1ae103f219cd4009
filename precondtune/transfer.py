"""Hyperparameters transferred from a tuned AdamW (or a tuned Muon in another lr convention), zero-shot.

For each target optimizer the module's own rule ``spec.from_adamw(lr=, betas=, eps=, weight_decay=)`` gives
the main config (with the rule in one line and its source); the roles the optimizer does not update
(embeddings, the head and vectors for Muon, Shampoo, SOAP, ...) get an explicit AdamW rule that keeps the tuned
AdamW values. The result is a schema-1 recommended config (:mod:`precondtune.config`).

Muon's learning-rate conventions. Public code writes the same Muon step
W ← W·(1 − lr·wd) − lr·s(rows, cols)·O with different update scales s: Keller Jordan's ``keller`` (√max(1,
rows/cols)), Moonlight's ``moonlight`` (0.2·√max(rows, cols), arXiv 2502.16982 §2.2) and ``spectral``
(√(rows/cols), arXiv 2310.17813). Converting convention A at lr to convention B keeps the step of every matrix
by setting, per matrix shape, lr_B = lr_A·s_A/s_B and wd_B = wd_A·lr_A/lr_B (weight decay uses the unscaled lr,
so lr·wd must not change). One lr cannot say that when the ratio differs between shapes, so the shape group
with the most parameters sets the main lr and each other shape gets a routing rule naming its parameters.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import optim
from .config import RecommendedConfig, as_tuples, dumps, format_for, plain, validate, write_text_atomic
from .errors import ConfigError, PrecondtuneError
from .inventory import ParamInfo
from .optim import adamw, muon

CONVENTIONS = {"keller": "original", "moonlight": "match_rms_adamw", "spectral": "spectral"}
"""Muon lr conventions by their public names -> the ``scale`` mode of :class:`precondtune.optim.muon.Config`
(the mode names themselves are accepted too)."""

SOURCES = ("adamw", "muon")
ROLE_ORDER = ("matrix", "conv", "batched", "embedding", "head", "vector")

CONVERSION_SOURCE = ("exact identity of W ← W·(1−lr·wd) − lr·s(rows, cols)·O across update scales: Keller "
                     "Jordan's Muon (√max(1, rows/cols)), Moonlight arXiv 2502.16982 §2.2 (0.2·√max(rows, cols)), "
                     "spectral condition arXiv 2310.17813 (√(rows/cols))")


def scale_mode(convention: str) -> str:
    """``keller``/``moonlight``/``spectral`` (or a Muon ``scale`` mode) -> the Muon ``scale`` mode."""
    key = convention.strip().lower().replace("-", "_")
    if key in CONVENTIONS:
        return CONVENTIONS[key]
    if key in CONVENTIONS.values():
        return key
    raise ConfigError(f"--convention {convention!r}: valid: {', '.join(CONVENTIONS)} "
                      f"(or {', '.join(CONVENTIONS.values())})")


def convention_name(mode: str) -> str:
    """A Muon ``scale`` mode -> its public convention name."""
    return {v: k for k, v in CONVENTIONS.items()}.get(mode, mode)


@dataclass(frozen=True)
class ShapeGroup:
    """Muon parameters of one matrix shape after a convention conversion: their lr and weight decay."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    roles: tuple[str, ...]
    scale_from: float
    scale_to: float
    lr: float
    weight_decay: float
    numel: int


@dataclass(frozen=True)
class Transferred:
    """One target optimizer: its recommended config, the rule (one line) and its source, and what it routes."""

    optimizer: str
    config: RecommendedConfig
    rule: str
    source: str
    shapes: tuple[ShapeGroup, ...] = ()
    groups: tuple[dict[str, Any], ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        return plain({"name": self.optimizer, "rule": self.rule, "source": self.source,
                      "config": self.config.as_dict(), "groups": list(self.groups),
                      "shapes": [{"shape": list(s.shape), "parameters": list(s.names), "roles": list(s.roles),
                                  "scale_from": s.scale_from, "scale_to": s.scale_to, "lr": s.lr,
                                  "weight_decay": s.weight_decay, "numel": s.numel} for s in self.shapes]})


def _plain_hp(config: Any) -> dict[str, Any]:
    return plain(optim.config_dict(config))


def fallback_rules(spec: optim.OptimizerSpec, adam_hp: dict[str, Any]) -> list[dict[str, Any]]:
    """Roles ``spec`` does not update -> AdamW with the tuned AdamW values (first match wins, so explicit)."""
    other = [r for r in ROLE_ORDER if r not in spec.roles]
    if not other:
        return []
    return [{"match": "|".join(other), "optimizer": "adamw", "hyperparameters": dict(adam_hp)}]


def _round(x: float) -> float:
    """12 significant digits: shapes whose ratios agree mathematically (√3/(0.2·√192) = 1/1.6) share one
    group instead of differing in the last bit; the change (≤ 5e-13 relative) is far below fp32's 6e-8."""
    return float(f"{x:.12g}")


def convert_muon(infos: Sequence[ParamInfo], hyperparameters: dict[str, Any], to_mode: str
                 ) -> tuple[dict[str, Any], list[dict[str, Any]], tuple[ShapeGroup, ...]]:
    """Re-express a Muon config in update scale ``to_mode`` with every matrix's step unchanged (module
    docstring): the new main hyperparameters, per-shape routing rules, and the shape table."""
    from_mode = hyperparameters.get("scale", muon.Config.scale)
    lr, wd = float(hyperparameters["lr"]), float(hyperparameters.get("weight_decay", 0.0))
    handled = [i for i in infos if i.role in muon.SPEC.roles]
    by_shape: dict[tuple[int, ...], list[ParamInfo]] = {}
    for info in handled:
        rows, cols = muon.matrix_view(tuple(info.shape), info.role)[-2:]
        by_shape.setdefault((rows, cols), []).append(info)
    shapes = []
    for (rows, cols), members in by_shape.items():
        s_from = muon.update_scale(rows, cols, from_mode)
        s_to = muon.update_scale(rows, cols, to_mode)
        new_lr = _round(lr * s_from / s_to)
        shapes.append(ShapeGroup(
            shape=(rows, cols), names=tuple(i.name for i in members),
            roles=tuple(dict.fromkeys(i.role for i in members)), scale_from=s_from, scale_to=s_to, lr=new_lr,
            weight_decay=_round(wd * lr / new_lr), numel=sum(i.numel for i in members)))
    main_hp = {**hyperparameters, "scale": to_mode}
    if not shapes:
        return main_hp, [], ()
    totals: dict[tuple[float, float], int] = {}
    for s in shapes:
        totals[(s.lr, s.weight_decay)] = totals.get((s.lr, s.weight_decay), 0) + s.numel
    main_lr, main_wd = max(totals, key=lambda k: totals[k])  # ties: the first shape seen
    main_hp.update(lr=main_lr, weight_decay=main_wd)
    rules = []
    for s in shapes:
        if (s.lr, s.weight_decay) == (main_lr, main_wd):
            continue
        rules.append({"match": "|".join(s.roles), "optimizer": "muon",
                      # also under DDP/FSDP (module.) and torch.compile (_orig_mod.) wrappers
                      "name": r"^(?:module\.|_orig_mod\.)*(?:" + "|".join(re.escape(n) for n in s.names) + ")$",
                      "hyperparameters": {"lr": s.lr, "weight_decay": s.weight_decay}})
    return main_hp, rules, tuple(shapes)


def _groups(name: str, infos: Sequence[ParamInfo], routing: list[dict[str, Any]], hp: dict[str, Any]
            ) -> tuple[dict[str, Any], ...]:
    """What the routing does to this model: per (role, optimizer, lr) the tensors and elements it covers."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for a in optim.route(name, list(infos), routing, **hp):
        lr = getattr(a.config, "lr", None)
        key = (a.info.role, a.spec.name, lr)
        row = rows.setdefault(key, {"role": a.info.role, "optimizer": a.spec.name, "lr": lr,
                                    "tensors": 0, "numel": 0})
        row["tensors"] += 1
        row["numel"] += a.info.numel
    return tuple(rows.values())


def _estimates(name: str, infos: Sequence[ParamInfo], routing: list[dict[str, Any]], hp: dict[str, Any]
               ) -> dict[str, Any]:
    return {"optimizer_state_bytes": optim.state_bytes(name, list(infos), routing=routing, **hp),
            "optimizer_step_flops": optim.amortized_step_flops(name, list(infos), routing=routing, **hp)}


def _finish(name: str, infos: Sequence[ParamInfo], hp: dict[str, Any], routing: list[dict[str, Any]],
            rule: str, source: str, evidence: dict[str, Any], shapes: tuple[ShapeGroup, ...] = ()) -> Transferred:
    rules = [{**r, "hyperparameters": dict(r["hyperparameters"])} for r in routing]
    doc = {"schema_version": 1, "optimizer": name, "hyperparameters": hp, "param_groups": rules,
           "estimates": _estimates(name, infos, rules, _tuple_hp(hp)) if infos else {},
           "evidence": {**evidence, "rule": rule, "source": source}}
    cfg = validate(doc, where=f"transferred {name} config")
    groups = _groups(name, infos, rules, _tuple_hp(hp)) if infos else ()
    return Transferred(name, cfg, rule, source, shapes, groups)


def with_traced_estimates(results: Sequence[Transferred], mf: Any, *, batch_size: int,
                          notes: list[str] | None = None) -> list[Transferred]:
    """``results`` with the recommended config's ``total_peak_bytes`` and ``flop_overhead`` added (SPEC.md's
    estimates; ``plan`` writes the same), traced and counted on ``mf``'s batch of ``batch_size``
    (:mod:`precondtune.memory`, :mod:`precondtune.flops`) for each transferred config, routing included.
    ``estimates.batch_size`` says which batch. A model file without ``sample_batch`` keeps the two it has, and so
    does a config whose step cannot be traced (e.g. Iso on a layer called through ``F.linear``), with the reason
    appended to ``notes``; the other configs are unaffected."""
    import dataclasses

    from .flops import analyze, with_counted_passes
    from .memory import MemoryPlanner, MemorySettings
    from .profiling import count_train_flops

    if not mf.can_sample:
        return list(results)
    planner = MemoryPlanner(mf, MemorySettings(batch_size=batch_size))
    rows: dict[str, int] = {}  # the rows each Linear sees, for hook costs (Iso)
    batch = mf.sample_batch(batch_size)
    train_flops = count_train_flops(mf, planner.m.module, batch, rows)
    infos = planner.m.infos
    out = []
    for t in results:
        cfg = t.config
        hp = _tuple_hp(cfg.hyperparameters)
        try:
            entry = planner.estimate(cfg.optimizer, hp, routing=cfg.param_groups or None)
        except (PrecondtuneError, RuntimeError, ValueError) as e:
            if notes is not None:
                notes.append(f"{cfg.optimizer}: no total_peak_bytes or flop_overhead in its estimates; its step "
                             f"could not be traced ({e})")
            out.append(t)
            continue
        a = with_counted_passes(analyze(cfg.optimizer, infos, routing=cfg.param_groups or None, hyperparameters=hp,
                                        rows=rows), mf, planner.m.module, batch, cfg.optimizer, train_flops,
                                routing=cfg.param_groups or None, hyperparameters=hp)
        step = a.total_amortized(train_flops)  # Sophia's Hessian passes and Iso's hook work included
        estimates = {**cfg.estimates, "optimizer_step_flops": step, "total_peak_bytes": int(entry["bytes"]["total_peak"]),
                     "flop_overhead": step / train_flops if train_flops else None, "batch_size": batch_size}
        out.append(dataclasses.replace(t, config=dataclasses.replace(cfg, estimates=estimates)))
    return out


def _tuple_hp(hp: dict[str, Any]) -> dict[str, Any]:
    return {k: as_tuples(v) for k, v in hp.items()}


def _check_positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{name} {value!r} is out of range; allowed: {'>= 0' if allow_zero else '> 0'}")


def transfer(infos: Sequence[ParamInfo], to: str | Iterable[str] = "all", *, lr: float,
             betas: tuple[float, float] | None = None, eps: float | None = None,
             weight_decay: float | None = None, source: str = "adamw", convention: str | None = None,
             target_convention: str | None = None) -> list[Transferred]:
    """Transferred configs for ``to`` (``"all"``, ``"muon,soap"`` or names) from a tuned ``source``.

    ``source="adamw"``: each optimizer's ``from_adamw`` rule; ``target_convention`` re-expresses Muon's lr in
    that convention (per shape). ``source="muon"``: a Muon tuned at ``lr`` in ``convention``, converted exactly
    to ``target_convention`` (only ``to="muon"``). ``infos`` is the model's inventory
    (:func:`precondtune.inventory.inventory`); it decides the per-shape rules and the estimates.
    """
    _check_positive("--lr", lr)
    _check_positive("--eps", eps, allow_zero=True)
    _check_positive("--weight-decay", weight_decay, allow_zero=True)
    if betas is not None and not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ConfigError(f"--betas {','.join(map(str, betas))} is out of range; allowed: two values in [0, 1), "
                          "e.g. 0.9,0.95")
    src = source.strip().lower()
    if src not in SOURCES:
        raise ConfigError(f"--from {source!r}: valid: {', '.join(SOURCES)}")
    names = optim.resolve_names(to)
    if src == "muon":
        return [_from_muon(infos, names, lr=lr, weight_decay=weight_decay, convention=convention,
                           target_convention=target_convention, betas=betas, eps=eps)]
    if convention is not None and target_convention is None:
        target_convention = convention  # with --from adamw, a single --convention is the target's
    if target_convention is not None and "muon" not in names:
        raise ConfigError("--convention applies to muon's lr; add muon to --to or drop --convention")
    tuned = adamw.Config(lr=lr, betas=tuple(betas) if betas is not None else adamw.Config.betas,
                         eps=adamw.Config.eps if eps is None else eps,
                         weight_decay=adamw.Config.weight_decay if weight_decay is None else weight_decay)
    adam_hp = {"lr": tuned.lr, "betas": list(tuned.betas), "eps": tuned.eps, "weight_decay": tuned.weight_decay}
    evidence = {"transferred_from": {"optimizer": "adamw", **adam_hp}}
    out = []
    for name in names:
        spec = optim.get_spec(name)
        try:
            t = spec.from_adamw(lr=tuned.lr, betas=tuned.betas, eps=tuned.eps, weight_decay=tuned.weight_decay)
        except (ValueError, ConfigError) as e:
            raise ConfigError(f"--to {spec.name}: these AdamW values give no valid {spec.name} config ({e}); change "
                              f"them or leave {spec.name} out of --to") from e
        hp = _plain_hp(t.config)
        routing = fallback_rules(spec, adam_hp) if spec.name != "adamw" else []
        rule, shapes = t.rule, ()
        if spec.name == "muon" and target_convention is not None:
            to_mode = scale_mode(target_convention)
            if to_mode != hp.get("scale"):
                hp, shape_rules, shapes = convert_muon(infos, hp, to_mode)
                routing = shape_rules + routing
                rule += (f"; then re-expressed in the {convention_name(to_mode)} convention per matrix shape "
                         "(lr·s and lr·wd unchanged)")
        if routing and routing[-1]["optimizer"] == "adamw" and spec.name != "adamw":
            rule += "; roles it does not update -> adamw with the tuned AdamW values"
        out.append(_finish(spec.name, infos, hp, routing, rule, t.source, evidence, shapes))
    return out


def _from_muon(infos: Sequence[ParamInfo], names: list[str], *, lr: float, weight_decay: float | None,
               convention: str | None, target_convention: str | None, betas: Any, eps: Any) -> Transferred:
    if names != ["muon"]:
        raise ConfigError("--from muon converts between Muon lr conventions; use --to muon")
    if betas is not None or eps is not None:
        raise ConfigError("--betas and --eps describe an AdamW; with --from muon give --lr, --weight-decay and "
                          "--convention twice (source, then target)")
    if convention is None or target_convention is None:
        raise ConfigError("--from muon needs --convention twice: the tuned lr's, then the target's "
                          f"(e.g. --convention keller --convention moonlight; valid: {', '.join(CONVENTIONS)})")
    from_mode, to_mode = scale_mode(convention), scale_mode(target_convention)
    wd = muon.Config.weight_decay if weight_decay is None else weight_decay
    tuned = _plain_hp(muon.Config(lr=lr, weight_decay=wd, scale=from_mode))
    hp, rules, shapes = convert_muon(infos, tuned, to_mode)
    rule = (f"lr per matrix shape: lr·s_{convention_name(from_mode)}(rows, cols)/s_{convention_name(to_mode)}"
            "(rows, cols); weight_decay so lr·wd is unchanged")
    evidence = {"transferred_from": {"optimizer": "muon", "lr": lr, "weight_decay": wd,
                                     "convention": convention_name(from_mode)}}
    return _finish("muon", infos, hp, rules, rule, CONVERSION_SOURCE, evidence, shapes)


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def write_configs(results: Sequence[Transferred], out: str | Path, fmt: str | None = None) -> list[Path]:
    """Write each result's recommended config; nothing is written unless every path and text is good.

    One result: ``out`` is the file (or an existing directory, then ``<out>/<name>.yaml``). Several: ``out`` is a
    directory (created if missing) holding ``<name>.yaml`` (or ``.json``) per optimizer; a path that is a file
    or ends in .yaml/.yml/.json is rejected.
    """
    out = Path(out)
    if not results:
        return []
    if len(results) == 1 and not out.is_dir():
        form = format_for(out, fmt)
        targets = [(out, form)]
    else:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: is a file, but {len(results)} optimizers need one file each; "
                              "give a directory (e.g. --out configs/)")
        if not out.exists() and out.suffix.lower() in CONFIG_SUFFIXES and len(results) > 1:
            raise ConfigError(f"--out {out}: looks like a file, but {len(results)} optimizers need one file each; "
                              f"give a directory (e.g. --out {out.with_suffix('')}/) or a single --to NAME")
        form = format_for("x.yaml", fmt)
        targets = [(out / f"{r.optimizer}.{form}", form) for r in results]
    texts = [dumps(r.config, form) for r, (_, form) in zip(results, targets)]
    written = []
    for (path, _), text in zip(targets, texts):
        written.append(write_text_atomic(path, text))
    return written
