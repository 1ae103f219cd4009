"""The recommended-config file (SPEC.md, "The recommended config"): schema, validation, atomic write, build.

    schema_version: 1
    optimizer: muon
    hyperparameters: {lr: 0.02, momentum: 0.95, ...}
    param_groups:                      # ordered routing rules, first match wins
      - {match: "embedding|head|vector", optimizer: adamw, hyperparameters: {lr: 0.003, betas: [0.9, 0.95]}}
    estimates: {optimizer_state_bytes: 0, ...}
    evidence: {...}

``match`` is a regular expression full-matched against each parameter's role; an optional ``name`` is searched
in the parameter's name (``precondtune.optim.Rule``). A rule without ``optimizer`` (or naming the main one)
overrides the main optimizer's hyperparameters for its parameters. :func:`build_optimizer` builds exactly
what the file says through ``precondtune.optim.build(..., routing=...)``; roles no rule matches follow the
main optimizer's default routing. Every problem is a :class:`ConfigError` that names the key.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import optim
from .errors import ConfigError
from .inventory import ROLES

SCHEMA_VERSION = 1
KEYS = ("schema_version", "optimizer", "hyperparameters", "param_groups", "estimates", "evidence")
FORMATS = ("yaml", "json")

_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
"""YAML 1.1 (PyYAML) reads ``1e-8`` as a string: a float needs a dot (``1.0e-8``); such strings become floats."""


@dataclass(frozen=True)
class RecommendedConfig:
    """A validated recommended config (canonical optimizer names; values as written, lists for tuples)."""

    optimizer: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    estimates: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The document as written to disk (key order of the schema)."""
        return plain({"schema_version": SCHEMA_VERSION, "optimizer": self.optimizer,
                      "hyperparameters": self.hyperparameters, "param_groups": self.param_groups,
                      "estimates": self.estimates, "evidence": self.evidence})


def plain(value: Any) -> Any:
    """Tuples -> lists, tensors/numpy scalars -> Python numbers, recursively (what YAML and JSON can hold)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    if hasattr(value, "tolist") and callable(value.tolist) and getattr(value, "ndim", 0) > 0:
        return plain(value.tolist())  # a numpy array or tensor
    if type(value) in (bool, int, float, str) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):
        return value.item()  # numpy scalars (np.float64 subclasses float, but YAML cannot write it), 0-d tensors
    return value


def as_tuples(value: Any) -> Any:
    """Lists -> tuples, recursively (Config fields such as betas and ns_coefficients are tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(as_tuples(v) for v in value)
    return value


def _mapping(doc: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {key} must be a mapping; got {type(value).__name__}")
    return dict(value)


def _check_hyperparameters(spec: optim.OptimizerSpec, hp: Mapping[str, Any], where: str) -> None:
    try:
        spec.config(**{k: as_tuples(v) for k, v in hp.items()})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _alternatives(pattern: str) -> list[str]:
    """The top-level ``|`` alternatives of a regular expression (not those inside a group or a character class)."""
    out, depth, in_class, start, i = [], 0, False, 0, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            i += pattern[i + 1:i + 2] == "^"
            i += pattern[i + 1:i + 2] == "]"  # a ']' right after '[' or '[^' is a literal
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
        i += 1
    return [*out, pattern[start:]]


def _matches_a_role(pattern: str, flags: int = 0) -> bool:
    try:
        return any(re.fullmatch(pattern, role, flags) for role in ROLES)
    except re.error:  # an alternative that is no regular expression on its own: judged with the whole pattern
        return True


def _check_regex(pattern: Any, where: str) -> str:
    if not isinstance(pattern, str):
        raise ConfigError(f"{where} must be a regular expression string; got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{where}: bad regular expression {pattern!r} ({e})") from None
    return pattern


def validate(doc: Any, *, where: str = "config") -> RecommendedConfig:
    """Check a config document against schema 1; unknown keys, optimizers, hyperparameters and out-of-range
    values raise :class:`ConfigError` naming the key (and ``where``, e.g. the file)."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: a recommended config is a mapping with keys {', '.join(KEYS)}; "
                          f"got {type(doc).__name__}")
    doc = plain(doc)
    unknown = [k for k in doc if k not in KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(KEYS)}")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ConfigError(f"{where}: schema_version must be {SCHEMA_VERSION}; got {version!r} "
                          "(this precondtune reads schema 1)")
    if not isinstance(doc.get("optimizer"), str):
        raise ConfigError(f"{where}: optimizer must name an optimizer ({', '.join(optim.available())})")
    try:
        main = optim.get_spec(doc["optimizer"])
    except ConfigError as e:
        raise ConfigError(f"{where}: optimizer: {e}") from None
    hp = _mapping(doc, "hyperparameters", where)
    _check_hyperparameters(main, hp, f"{where}: hyperparameters")
    groups = doc.get("param_groups") or []
    if not isinstance(groups, list):
        raise ConfigError(f"{where}: param_groups must be a list of rules {{match, optimizer, hyperparameters}}")
    out_groups = []
    for k, g in enumerate(groups):
        at = f"{where}: param_groups[{k}]"
        if not isinstance(g, Mapping):
            raise ConfigError(f"{at} must be a mapping {{match, optimizer, hyperparameters, name}}")
        bad = [key for key in g if key not in ("match", "optimizer", "hyperparameters", "name")]
        if bad:
            raise ConfigError(f"{at}: unknown key {bad[0]!r}; valid: match, optimizer, hyperparameters, name")
        if "match" not in g:
            raise ConfigError(f"{at}: missing key 'match' (a regular expression over roles, e.g. 'embedding|head')")
        rule: dict[str, Any] = {"match": _check_regex(g["match"], f"{at}.match")}
        flags = re.compile(rule["match"]).flags  # inline flags such as (?i) hold for every alternative
        dead = next((alt for alt in _alternatives(rule["match"]) if not _matches_a_role(alt, flags)), None)
        if dead is not None:
            what = (f"{at}.match {rule['match']!r} matches no role, so the rule would apply to nothing"
                    if dead == rule["match"] else
                    f"{at}.match {rule['match']!r}: its alternative {dead!r} matches no role (a misspelt role?)")
            raise ConfigError(f"{what}; match is full-matched against a parameter's role: {', '.join(ROLES)} "
                              "(a parameter name goes in 'name')")
        if g.get("name") is not None:
            rule["name"] = _check_regex(g["name"], f"{at}.name")
        if g.get("optimizer") is not None and not isinstance(g["optimizer"], str):
            raise ConfigError(f"{at}.optimizer must name an optimizer; got {g['optimizer']!r}")
        try:
            spec = optim.get_spec(g["optimizer"]) if g.get("optimizer") else main
        except ConfigError as e:
            raise ConfigError(f"{at}.optimizer: {e}") from None
        rule["optimizer"] = spec.name
        group_hp = _mapping(g, "hyperparameters", at)
        merged = {**hp, **group_hp} if spec is main else group_hp
        _check_hyperparameters(spec, merged, f"{at}.hyperparameters")
        rule["hyperparameters"] = group_hp
        out_groups.append(rule)
    return RecommendedConfig(optimizer=main.name, hyperparameters=hp, param_groups=out_groups,
                             estimates=_mapping(doc, "estimates", where), evidence=_mapping(doc, "evidence", where))


def load(source: str | os.PathLike[str] | Mapping[str, Any]) -> RecommendedConfig:
    """Read (YAML or JSON, by content) and validate a recommended config, or validate a dict."""
    if isinstance(source, Mapping):
        return validate(source)
    path = Path(source)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give the config file in it, e.g. {path / 'recommended.yaml'}")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; write one with `precondtune transfer` or `precondtune plan`")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML/JSON ({' '.join(str(e).split())[:200]})") from None
    return validate(doc, where=str(path))


def dumps(config: RecommendedConfig | Mapping[str, Any], fmt: str = "yaml") -> str:
    """The document as YAML (block layout, flow-style leaves) or JSON text."""
    doc = config.as_dict() if isinstance(config, RecommendedConfig) else plain(config)
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    if fmt != "yaml":
        raise ConfigError(f"--format {fmt!r}: valid: {', '.join(FORMATS)}")
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=110, allow_unicode=True)


def format_for(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """``fmt`` if given, else ``json`` for a ``.json`` path and ``yaml`` otherwise."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(f"--format {fmt!r}: valid: {', '.join(FORMATS)}")
        return fmt
    return "json" if Path(path).suffix.lower() == ".json" else "yaml"


def cannot_create_in(directory: str | os.PathLike[str]) -> str | None:
    """Why no file can be created in ``directory``, or None when one can: found by making one and removing it at
    once (a permission check alone passes for root where nothing can be written, e.g. under /proc)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".precondtune-probe-", dir=directory)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(probe)
    return None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place: a reader sees the old file
    or the whole new one, never half of it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name such as {path / 'recommended.yaml'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        blocker = next((a for a in path.parents if a.exists()), None)
        why = f"{blocker} is a file, not a directory" if blocker is not None and not blocker.is_dir() else (
            e.strerror or str(e))
        raise ConfigError(f"cannot write {path}: {why}; give a path in a writable directory") from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a config or report is an ordinary file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write(config: RecommendedConfig | Mapping[str, Any], path: str | os.PathLike[str], fmt: str | None = None) -> Path:
    """Validate, then write atomically (:func:`write_text_atomic`); the format follows :func:`format_for`."""
    cfg = config if isinstance(config, RecommendedConfig) else validate(config)
    return write_text_atomic(path, dumps(cfg, format_for(path, fmt)))


def routing(config: RecommendedConfig) -> list[dict[str, Any]]:
    """The config's ``param_groups`` as ``precondtune.optim.build`` routing rules (tuples restored)."""
    return [{**g, "hyperparameters": {k: as_tuples(v) for k, v in g["hyperparameters"].items()}}
            for g in config.param_groups]


def build_optimizer(model: nn.Module | Any, config: str | os.PathLike[str] | Mapping[str, Any] | RecommendedConfig
                    ) -> torch.optim.Optimizer:
    """A working ``torch.optim.Optimizer`` for ``model``: exactly the optimizer, hyperparameters and routing the
    config says (``precondtune.build_optimizer(model, "recommended.yaml")``)."""
    cfg = config if isinstance(config, RecommendedConfig) else load(config)
    hp = {k: as_tuples(v) for k, v in cfg.hyperparameters.items()}
    try:
        return optim.build(cfg.optimizer, model, routing=routing(cfg), **hp)
    except ConfigError as e:  # the file's routing cannot take this model: say which file
        if isinstance(config, (str, os.PathLike)):
            raise ConfigError(f"{config}: {e}") from None
        raise
