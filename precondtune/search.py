"""Short, honest Optuna searches: one study per (model, optimizer), persisted in an Optuna storage.

A trial is :func:`precondtune.training.train` on the study's shared :class:`~precondtune.training.TrialData`
(same seeded weights, same batches, the full short schedule), scored by the mean eval loss at the end. The
optimizer's ``search_space(trial, base)`` defines the space (STYLE.md: Optuna's define-by-run idiom); the
optimizer's defaults and, given a tuned AdamW, its ``from_adamw`` transfer are enqueued first, and the lr range
is centred on the transferred lr. Diverging trials are pruned with their reason in the trial's user attrs;
exceptions (CUDA OOM included) fail that trial with its reason and the study goes on. Each trial stores its full
Config in its ``result`` user attr (:data:`RESULT_ATTR`), so the best config is rebuilt exactly
(``spec.config(**hp)``).

Storage (``--storage``), all Optuna's own:

- nothing: ``sqlite:///precondtune-studies.db`` in the working directory (:data:`DEFAULT_STORAGE`);
- ``sqlite:///path.db``, ``postgresql://user:pw@host/db``, ``mysql://...``: :class:`optuna.storages.RDBStorage`
  with heartbeats, so a killed worker's trial is failed and re-run once (grace :data:`GRACE_SECONDS`);
- ``journal:///abs/path.log``, ``journal:rel/path.log`` or any path ending in ``.log``/``.jsonl``: Optuna's
  :class:`~optuna.storages.JournalStorage` on a file (safe for several processes and NFS);
- ``sqlite:///:memory:`` or ``memory``: in-memory, one process, nothing kept.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import multiprocessing
import shlex
import socket
import statistics
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from . import stopping
from .config import cannot_create_in
from .errors import ConfigError, PrecondtuneError
from .inventory import count_parameters
from .modelfile import ModelFile, _one_line, load_model_file, move_to
from .optim import OptimizerSpec, build, config_dict, get_spec, make_config
from .profiling import resolve_device
from .stopping import Terminated
from .training import Schedule, TrialData, find_hook, prepare, train

DEFAULT_STORAGE = "sqlite:///precondtune-studies.db"
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
"""A RUNNING trial whose heartbeat is older than this is failed (its process was killed) and re-run once."""
SQLITE_BUSY_SECONDS = 60
"""SQLite lock wait: several local workers write to one file; Optuna's default (5 s) times out under load."""
PROBES = 48
"""Random draws of a search space used to list its knobs (covers conditional branches such as Adafactor's
momentum on/off)."""
TOP_FOR_SEEDS = 3
"""``--seeds K`` re-runs this many of the best configs."""
SNAPSHOT_SECONDS = 10.0
"""Longest a pruner's snapshot of the completed trials is reused before it is read again (:class:`CompletedSnapshot`)."""
REPORTS_PER_TRIAL = 10
"""Intermediate values per trial (each a mean training loss over its window) offered to the pruner."""
PRUNE_AFTER = 0.2
"""The pruner judges a trial only from this share of its steps on (and never during the lr warmup). The training
loss of the first tenth ranks configurations poorly by their final eval loss: replaying 30 unpruned random trials
of ten example/optimizer pairs (benchmarks/pruning_start.py, docs/search.md), a median pruner starting at step 20
of 200 pruned the eventual best configuration in up to 86% of trial orders (chargpt AdamW 53%, Muon 62%); from
step 40 on it did so in at most 5% on chargpt and CNN AdamW/Muon, and the best survivor's final loss was within 0.01
of an interquartile range of the best everywhere but the MLP's near-tied Muon trials, while saving 54–59% of
steps instead of 62–71%."""
INTERRUPTED = "interrupted"
"""How the ``fail_reason`` of a trial stopped by Ctrl-C begins (``plan`` re-runs such a trial on resume)."""
STOPPED = "its process stopped before the trial ended (killed); its config is re-run once on resume"
"""The reason shown for a trial failed by the heartbeat check (it has no ``fail_reason``: nothing was left to write
it)."""
RESULT_ATTR = "result"
"""The trial user attr holding its run, written once when the run ends (each write is a commit): what it measured
(steps_run, start_loss, median_step_seconds, train_seconds, trial_seconds, final_train_loss), ``reports`` (every
window's mean training loss by step, those written for the pruner and those before it), ``hyperparameters`` (the
full Config) and, when pruned, ``pruned_reason``. Alongside it: ``fail_reason`` for a failed trial, and for warm
starts ``enqueued``. Studies of earlier releases kept ``hyperparameters`` and ``pruned_reason`` as attrs of
their own (:func:`hyperparameters_of`, :func:`pruned_reason_of` read both)."""
SAMPLERS = ("tpe", "gp", "cmaes", "random")
PRUNERS = ("median", "halving", "none")


@dataclass(frozen=True)
class AdamWReference:
    """A tuned AdamW to transfer from (``--adam-lr/--adam-betas/--adam-weight-decay``)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8


def adamw_reference(lr: float | None, betas: str | None = None, weight_decay: float | None = None
                    ) -> AdamWReference | None:
    """``--adam-lr/--adam-betas/--adam-weight-decay`` as an :class:`AdamWReference` (None without ``--adam-lr``)."""
    if lr is None:
        if betas is not None or weight_decay is not None:
            raise ConfigError("--adam-betas/--adam-weight-decay need --adam-lr (the tuned AdamW's learning rate)")
        return None
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"--adam-lr {lr}: give the tuned AdamW's learning rate, a finite positive number")
    b: tuple[float, ...] = AdamWReference.betas
    if betas is not None:
        try:
            b = tuple(float(x) for x in betas.strip("[]() ").split(","))
        except ValueError:
            b = ()
        if len(b) != 2 or not all(0 <= x < 1 for x in b):
            raise ConfigError(f"--adam-betas {betas!r}: expected two values in [0, 1), e.g. 0.9,0.95")
    wd = AdamWReference.weight_decay if weight_decay is None else weight_decay
    return AdamWReference(lr=lr, betas=b, weight_decay=wd)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SearchSettings:
    """Everything a search needs besides the model file; plain data, so worker processes receive it as is."""

    optimizer: str
    trials: int = 20
    steps: int = 200
    batch_size: int = 8
    storage: str | None = None
    study_name: str | None = None
    workers: int = 1
    timeout: float | None = None
    fixed: tuple[str, ...] = ()
    """``--set KEY=VALUE`` items."""
    enqueue: tuple[str, ...] = ()
    """``--enqueue KEY=VALUE[,KEY=VALUE...]`` items, one warm-start trial each."""
    seeds: int = 1
    adamw: AdamWReference | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    warmup: int | None = None
    decay: str = "cosine"
    device: str = "auto"
    seed: int = 0

    def schedule(self) -> Schedule:
        try:
            return Schedule(self.steps, self.warmup, self.decay)
        except ValueError as e:
            raise ConfigError(f"--steps/--warmup/--decay: {e}") from e

    @property
    def report_every(self) -> int:
        return max(1, self.steps // REPORTS_PER_TRIAL)


# --------------------------------------------------------------------------------------------------- storage

@dataclass(frozen=True)
class StorageRef:
    """An opened Optuna storage and how to show it to the user."""

    storage: Any
    url: str
    kind: str
    """"rdb", "journal" or "memory"."""


def is_memory_url(url: str) -> bool:
    """Whether ``url`` names an in-memory storage (it ends with the run)."""
    return url in ("memory", ":memory:", "sqlite://", "sqlite:///:memory:")


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        rest = url[len("journal:"):]
        return Path(rest.removeprefix("//"))
    if "://" not in url and url.endswith((".log", ".jsonl")):
        return Path(url)
    return None


TRIAL_SETTINGS = ("steps", "batch_size", "seed", "warmup", "decay")
"""The SearchSettings fields a study is made with (its ``trial_settings`` user attr; each is an option of its own)."""


def resume_options(settings: SearchSettings) -> str:
    """The options that select ``settings``' study again and add trials to it as this run did: its optimizer (a
    study is made for one, so the hint names it even when it is the default), its trial settings, sampler and
    pruner where they are not the defaults, the tuned AdamW transferred from, and every ``--set``."""
    default = SearchSettings(optimizer=settings.optimizer)
    return " ".join([f"--optimizer {settings.optimizer}"]
                    + [f"--{key.replace('_', '-')} {getattr(settings, key)}" for key in TRIAL_SETTINGS
                       if getattr(settings, key) != getattr(default, key)]
                    + ([adamw_options(settings.adamw)] if settings.adamw else [])
                    + [f"--set {shlex.quote(item)}" for item in settings.fixed]
                    + [f"--{key} {getattr(settings, key)}" for key in ("sampler", "pruner")
                       if getattr(settings, key) != getattr(default, key)])


def storage_url(url: str | None) -> str:
    """The URL a study lives at: the default SQLite file made absolute, other URLs as given (a relative SQLite
    path stays relative to where the command runs, as the user wrote it); an SQLite URL without a file name fails."""
    if url is None or url == DEFAULT_STORAGE:
        return "sqlite:///" + str(Path(DEFAULT_STORAGE[len("sqlite:///"):]).resolve())
    if url.startswith("sqlite:///") and not is_memory_url(url) and url.endswith("/"):
        raise ConfigError(f"--storage {url}: no file name; use e.g. sqlite:///studies.db")
    return url


def _with_driver(url: str) -> str:
    """``postgresql://`` with the installed driver: SQLAlchemy ≥ 2.1 defaults to psycopg 3, while the
    ``postgres`` extra installs psycopg2; an explicit ``postgresql+driver://`` is kept as given."""
    import importlib.util

    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix) and importlib.util.find_spec("psycopg") is None \
                and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def check_storage(url: str | None, *, workers: int = 1) -> None:
    """:func:`open_storage`'s checks without creating a file: a new SQLite or journal file is checked by its URL
    and directory, an existing file or a server by opening it."""
    _open(url, workers=workers, create_file=False)


def _check_parent(path: Path, url: str) -> None:
    if not path.parent.exists():
        raise ConfigError(f"--storage {url}: directory {path.parent} does not exist; create it first")
    if not path.parent.is_dir():
        raise ConfigError(f"--storage {url}: {path.parent} is a file, not a directory; give a path in a directory")


def _check_journal(path: Path, url: str) -> None:
    """An existing file is an Optuna journal (or empty) before Optuna appends a record to it."""
    if path.is_dir():
        raise ConfigError(f"--storage {url}: {path} is a directory; name a file in it, e.g. {path / 'studies.log'}")
    try:
        with path.open("rb") as f:
            first = f.readline(1 << 16)
    except OSError as e:
        raise ConfigError(f"--storage {url}: cannot read {path} ({e.strerror}); check its permissions") from e
    if not first.strip():
        return
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise ConfigError(f"--storage {url}: {path} is not an Optuna journal file (its first line is not a journal "
                          "record) and is left as it is; give a new file or an existing journal")


def _open_hint(scheme: str) -> str:
    if scheme == "sqlite":
        return "check that the file is an SQLite database and that you can write to it and to its directory"
    if scheme.startswith("mysql"):
        return ("check the URL, that the server is reachable and that a MySQL driver is installed "
                "(e.g. pip install pymysql, and mysql+pymysql://...)")
    if scheme.startswith("postgres"):
        return ("check the URL, that the server is reachable and that its driver is installed "
                "(pip install 'precondtune[postgres]')")
    return "check the URL, that the server is reachable and that SQLAlchemy's driver for it is installed"


def _check_creatable(path: Path, url: str) -> None:
    """A file can be made beside ``path`` (tried and removed at once: nothing is left behind)."""
    why = cannot_create_in(path.parent)
    if why is not None:
        raise ConfigError(f"--storage {url}: cannot create a file in {path.parent} ({why}); give a writable directory")


def open_storage(url: str | None, *, workers: int = 1) -> StorageRef:
    """Open ``url`` (see the module docstring); a bad or unreachable one raises :class:`ConfigError`."""
    ref = _open(url, workers=workers, create_file=True)
    assert ref is not None
    return ref


def _open(url: str | None, *, workers: int, create_file: bool) -> StorageRef | None:
    url = storage_url(url)
    if is_memory_url(url):
        if workers > 1:
            raise ConfigError(f"--storage {url} is in memory and cannot be shared by --workers {workers}; use a "
                              "file (sqlite:///studies.db or journal:///path/studies.log) or postgresql://")
        return StorageRef(optuna.storages.InMemoryStorage(), url, "memory")
    journal = _journal_path(url)
    if journal is not None:
        _check_parent(journal, url)
        if not journal.exists():
            _check_creatable(journal, url)
            if not create_file:
                return None
        else:
            _check_journal(journal, url)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return StorageRef(JournalStorage(JournalFileBackend(str(journal))), f"journal:///{journal.resolve()}",
                              "journal")
        except Exception as e:
            raise ConfigError(f"--storage {url}: cannot open the journal file ({_one_line(e)})") from e
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme.startswith(("sqlite", "postgresql", "postgres", "mysql", "oracle", "mssql")):
        raise ConfigError(f"--storage {url!r} is not a storage URL; use sqlite:///path.db, postgresql://user@host/db, "
                          "journal:///path.log or memory")
    if scheme == "sqlite":
        path = Path(url[len("sqlite:///"):])
        _check_parent(path, url)
        if path.is_dir():
            raise ConfigError(f"--storage {url}: {path} is a directory; name a file in it, e.g. {path / 'studies.db'}")
        if not path.exists():
            _check_creatable(path, url)
            if not create_file:
                return None
    engine = {"connect_args": {"timeout": SQLITE_BUSY_SECONDS}} if scheme == "sqlite" else {"pool_pre_ping": True}
    driver_url = _with_driver(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                driver_url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except Exception as e:
        raise ConfigError(f"--storage {url}: cannot open it ({_one_line(e)}); {_open_hint(scheme)}") from e
    if scheme == "sqlite":
        _fast_sqlite(storage.engine)
    return StorageRef(storage, url, "rdb")


def _fast_sqlite(engine: Any) -> None:
    """Write-ahead logging with ``synchronous=NORMAL``: a commit no longer waits for an fsync of the database
    (each trial writes ~20 times: its reports to the pruner and its results), and readers never block the writer,
    which local ``--workers`` share. A crash or kill of the process loses no committed trial; only a power cut can
    lose the last commits (SQLite's documented WAL trade-off). Use journal:// storage on NFS, where WAL does not work."""
    from sqlalchemy import event

    def pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections opened while Optuna set the schema up get the pragmas when reopened


# ----------------------------------------------------------------------------------------------------- knobs

def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"1e-3"`` -> 0.001, ``"true"`` -> True, ``"[0.9,0.95]"`` -> [0.9, 0.95], else the string."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if t.lower() in ("none", "null"):
        return None
    try:
        return json.loads(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def parse_assignments(text: str, *, option: str) -> dict[str, Any]:
    """``"lr=0.01,betas=[0.9,0.95]"`` -> dict; commas inside brackets belong to the value."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out: dict[str, Any] = {}
    for p in parts:
        if not p.strip():
            continue
        key, eq, value = p.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{option} {text!r}: expected KEY=VALUE[,KEY=VALUE...]; a list value goes in brackets, "
                              "e.g. betas=[0.9,0.99]")
        if key.strip() in out:
            raise ConfigError(f"{option} {text!r}: {key.strip()} is given twice; give it once")
        out[key.strip()] = parse_value(value)
    if not out:
        raise ConfigError(f"{option} {text!r}: expected KEY=VALUE[,KEY=VALUE...], e.g. lr=0.01")
    return out


def merge_sets(items: Sequence[str]) -> dict[str, Any]:
    """Every ``--set`` item's assignments together; a knob fixed by two of them is refused, not silently the last."""
    fixed: dict[str, Any] = {}
    for item in items:
        values = parse_assignments(item, option="--set")
        twice = next((k for k in values if k in fixed), None)
        if twice is not None:
            raise ConfigError(f"--set {twice} is given twice ({fixed[twice]!r} and {values[twice]!r}); give it once")
        fixed.update(values)
    return fixed


def fallback_routing(spec: OptimizerSpec, adamw: AdamWReference | None) -> list[dict[str, Any]] | None:
    """With a tuned AdamW, the roles ``spec`` does not update keep the tuned AdamW values (the transfer rule's
    fallback, :func:`precondtune.transfer.fallback_rules`); without one, the registry's default routing."""
    if adamw is None or spec.name == "adamw":
        return None
    from .transfer import fallback_rules

    return fallback_rules(spec, {"lr": adamw.lr, "betas": tuple(adamw.betas), "eps": adamw.eps,
                                 "weight_decay": adamw.weight_decay}) or None


def _base(spec: OptimizerSpec, adamw: AdamWReference | None) -> Any:
    if adamw is None:
        return None
    try:
        return spec.from_adamw(lr=adamw.lr, betas=adamw.betas, eps=adamw.eps, weight_decay=adamw.weight_decay).config
    except ValueError as e:
        raise ConfigError(f"--adam-lr/--adam-betas: these AdamW values give no valid {spec.name} config to start "
                          f"from ({e}); change them") from e


def discover_knobs(spec: OptimizerSpec, base: Any = None) -> dict[str, BaseDistribution]:
    """The trial parameters ``spec.search_space`` suggests, with their distributions (union over random draws)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    finally:
        optuna.logging.set_verbosity(verbosity)
    knobs: dict[str, BaseDistribution] = {}
    for _ in range(PROBES):
        trial = study.ask()
        try:
            spec.search_space(trial, base)
        except (ValueError, PrecondtuneError):
            pass  # a draw the Config rejects still names its knobs; the FixedTrial tests catch such spaces
        for name, dist in trial.distributions.items():
            knobs.setdefault(name, dist)
    return knobs


def _contains(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and dist.low <= value <= dist.high
    return False


def _describe(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "one of " + ", ".join(map(str, dist.choices))
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        return f"[{dist.low:g}, {dist.high:g}]"
    return str(dist)


def _clip(dist: BaseDistribution, value: Any) -> Any:
    if isinstance(dist, FloatDistribution):
        return min(max(float(value), dist.low), dist.high)
    if isinstance(dist, IntDistribution):
        return int(min(max(int(value), dist.low), dist.high))
    return value


@dataclass(frozen=True)
class Knobs:
    """A search space's knobs: trial parameters (with distributions) and the Config's fields."""

    spec: OptimizerSpec
    params: dict[str, BaseDistribution]
    fields: tuple[str, ...]

    @classmethod
    def of(cls, spec: OptimizerSpec, base: Any = None) -> Knobs:
        return cls(spec, discover_knobs(spec, base), tuple(f.name for f in dataclasses.fields(spec.config_cls)))

    def valid(self) -> list[str]:
        aliases = [p[len("one_minus_"):] for p in self.params if p.startswith("one_minus_")]
        return sorted(set(self.params) | set(self.fields) | set(aliases))

    def _field_hint(self, key: str) -> str:
        """How to fix a searched knob at a value outside its searched range: through its Config field."""
        name = key.removeprefix("one_minus_")
        if name in ("beta1", "beta2") and "betas" in self.fields:
            return "; to fix it outside that range, give the field: betas=[BETA1,BETA2], e.g. betas=[0.5,0.999]"
        if name != key and name in self.fields:
            return f"; to fix it outside that range, give the field: {name}=VALUE"
        return ""

    def resolve(self, values: dict[str, Any], *, option: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``values`` -> (trial params to fix, Config fields to override), each checked; bad ones raise."""
        params: dict[str, Any] = {}
        fields: dict[str, Any] = {}
        both = [k for k in ("beta1", "beta2") if k in values and "betas" in values]
        if both:
            raise ConfigError(f"{option}: {both[0]}={values[both[0]]!r} and betas={values['betas']!r} both set "
                              f"{both[0]}; give one of them")
        for key, value in values.items():
            inverse = f"one_minus_{key}"
            if inverse in self.params and isinstance(value, (int, float)) and not isinstance(value, bool):
                # beta1=0.95 fixes the trial param one_minus_beta1=0.05 (and the field, if there is one)
                if key not in self.fields and not _contains(self.params[inverse], 1 - value):
                    d = self.params[inverse]
                    raise ConfigError(f"{option} {key}={value!r} is outside {self.spec.name}'s searched range "
                                      f"[{1 - d.high:g}, {1 - d.low:g}]{self._field_hint(key)}")
                params[inverse] = 1 - value
                if key not in self.fields:
                    continue
            if key not in self.params and key not in self.fields:
                raise ConfigError(f"{option} {key}: {self.spec.name} has no knob {key!r}; valid: "
                                  f"{', '.join(self.valid())}")
            if key in self.params:
                if key not in self.fields and not _contains(self.params[key], value):
                    raise ConfigError(f"{option} {key}={value!r} is out of range for {self.spec.name}; allowed: "
                                      f"{_describe(self.params[key])}{self._field_hint(key)}")
                params[key] = value
            if key in self.fields:
                fields[key] = tuple(value) if isinstance(value, list) else value
                if key == "betas" and isinstance(value, (list, tuple)):
                    for k, b in enumerate(value[:2]):
                        if f"one_minus_beta{k + 1}" in self.params and isinstance(b, (int, float)):
                            params[f"one_minus_beta{k + 1}"] = 1 - b
        if fields:  # types and ranges as a config file's are checked, naming the key
            make_config(self.spec.config_cls, {**config_dict(self.spec.default_config()), **fields},
                        where=f"{option}: {self.spec.name}")
        return params, fields

    def params_of(self, config: Any) -> dict[str, Any]:
        """Trial params that reproduce ``config`` as closely as the space allows (clipped into range)."""
        out: dict[str, Any] = {}
        betas = getattr(config, "betas", None)
        for name, dist in self.params.items():
            value: Any = None
            if hasattr(config, name):
                value = getattr(config, name)
            elif name.startswith("one_minus_"):
                inner = name[len("one_minus_"):]
                if inner in ("beta1", "beta2") and isinstance(betas, (tuple, list)):
                    value = betas[int(inner[-1]) - 1]
                else:
                    value = getattr(config, inner, None)
                value = None if not isinstance(value, (int, float)) else 1 - value
            if value is None or isinstance(value, (tuple, list)):
                continue
            if isinstance(dist, CategoricalDistribution):
                if value in dist.choices:
                    out[name] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = _clip(dist, value)
        if self.spec.trial_params is not None:
            for name, value in self.spec.trial_params(config).items():
                if name in self.params:
                    out[name] = value if isinstance(self.params[name], CategoricalDistribution) \
                        else _clip(self.params[name], value)
        return out


class _FixedKnobs:
    """A trial whose ``--set`` knobs return their fixed value instead of being sampled (others delegate)."""

    def __init__(self, trial: optuna.Trial, fixed: dict[str, Any]) -> None:
        self._trial, self._fixed = trial, fixed

    def suggest_float(self, name: str, low: float, high: float, **kw: Any) -> float:
        return self._fixed[name] if name in self._fixed else self._trial.suggest_float(name, low, high, **kw)

    def suggest_int(self, name: str, low: int, high: int, **kw: Any) -> int:
        return self._fixed[name] if name in self._fixed else self._trial.suggest_int(name, low, high, **kw)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._fixed[name] if name in self._fixed else self._trial.suggest_categorical(name, choices)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)


def config_from_dict(spec: OptimizerSpec, hyperparameters: dict[str, Any]) -> Any:
    """Rebuild a Config exactly from its stored dict (JSON lists back to tuples, nested ones too)."""
    def tuples(v: Any) -> Any:
        return tuple(tuples(x) for x in v) if isinstance(v, (list, tuple)) else v

    return spec.config(**{k: tuples(v) for k, v in hyperparameters.items()})


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return v


# ------------------------------------------------------------------------------------------------- objective

class Objective:
    """The trial function: config from the search space (``--set`` knobs fixed), a short run, its eval loss."""

    def __init__(self, mf: ModelFile, settings: SearchSettings, data: TrialData | None = None) -> None:
        self.mf, self.settings = mf, settings
        self.spec = get_spec(settings.optimizer)
        self.base = _base(self.spec, settings.adamw)
        self.routing = fallback_routing(self.spec, settings.adamw)
        self.knobs = Knobs.of(self.spec, self.base)
        self.fixed_params, self.fixed_fields = self.knobs.resolve(merge_sets(settings.fixed), option="--set")
        self.schedule = settings.schedule()
        self._data = data

    @property
    def data(self) -> TrialData:
        if self._data is None:
            s = self.settings
            self._data = prepare(self.mf, steps=s.steps, batch_size=s.batch_size, seed=s.seed,
                                 device=resolve_device(s.device))
        return self._data

    def config(self, trial: optuna.Trial) -> Any:
        """The trial's Config: an exact enqueued/retried config if it has one, else the search space's."""
        # a warm start's exact config, or a re-run's (a killed trial's attrs are copied to it: its config where
        # the run got to write it, else its params, from which the config follows with --set)
        exact = hyperparameters_of(trial) or trial.user_attrs.get("enqueued_config")
        config = self.spec.search_space(_FixedKnobs(trial, self.fixed_params), self.base)
        if exact:
            config = config_from_dict(self.spec, exact)
        overrides = {**trial.user_attrs.get("overrides", {}), **self.fixed_fields}
        betas = getattr(config, "betas", None)
        if exact and isinstance(betas, tuple):  # --set beta1=… holds for the exact warm starts as well
            fixed = [self.fixed_params.get(f"one_minus_beta{k + 1}") for k in range(len(betas))]
            overrides.setdefault("betas", tuple(b if f is None else 1 - f for b, f in zip(betas, fixed)))
        if overrides:
            config = config_from_dict(self.spec, {**config_dict(config), **overrides})
        return config

    def __call__(self, trial: optuna.Trial) -> float:
        t0 = time.perf_counter()
        hp: dict[str, Any] | None = None
        try:
            stopping.check()
            hp = config_dict(self.config(trial))
            pruner, first = self.settings.pruner, judged_from(self.schedule, self.settings.report_every)

            def report(step: int, value: float) -> str | None:
                if step < first:  # no pruner judges it: kept in the result's reports, not written on its own
                    return None
                trial.report(value, step)
                if trial.should_prune():
                    return f"{pruner} pruner at step {step}: mean training loss {value:.4g}"
                return None

            result = train(self.data, self.spec.name, hp, schedule=self.schedule, routing=self.routing,
                           report_every=self.settings.report_every, callback=report)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt as e:
            how = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
            self._failed(trial, hp, f"{INTERRUPTED} ({how}); rerun the same command to resume")
            raise
        except Exception as e:
            if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._failed(trial, hp, _one_line(e))
            raise
        measured: dict[str, Any] = {
            "steps_run": result.steps_run, "start_loss": result.start_loss,
            "median_step_seconds": result.median_step_seconds, "train_seconds": result.train_seconds,
            "trial_seconds": time.perf_counter() - t0,
            "final_train_loss": result.losses[-1] if result.losses else None}
        measured = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in measured.items()}
        measured["reports"] = {str(k): v if math.isfinite(v) else None for k, v in result.reports.items()}
        measured["hyperparameters"] = _jsonable(hp)
        if result.stop_reason is not None:
            measured["pruned_reason"] = result.stop_reason
        trial.set_user_attr(RESULT_ATTR, measured)  # the trial's one write of its own (a commit: ≈ 1–2 ms on SQLite)
        if result.stop_reason is not None:
            raise optuna.TrialPruned(result.stop_reason)
        assert result.eval_loss is not None
        return result.eval_loss

    @staticmethod
    def _failed(trial: optuna.Trial, hp: dict[str, Any] | None, reason: str) -> None:
        """A failed trial's reason, and its config when it got that far (the table and CSV show it)."""
        if hp is not None:
            trial.set_user_attr(RESULT_ATTR, {"hyperparameters": _jsonable(hp)})
        trial.set_user_attr("fail_reason", reason)


# ----------------------------------------------------------------------------------------------------- study

def make_sampler(name: str, seed: int, trials: int, *, shared: bool = True) -> optuna.samplers.BaseSampler:
    """TPE (default; multivariate, constant liar when ``shared``), GP, CMA-ES or random.

    ``shared``: other processes may run trials of the study at the same time (:func:`is_shared`). TPE's constant
    liar then counts their running trials as bad so that they spread out; it costs an uncached read of the study
    and a write per sampled trial (≈ 4 ms on SQLite), and with one process it changes nothing: the only running
    trial is the one being sampled, which the liar leaves out."""
    startup = min(10, max(3, trials // 4))  # short searches: let TPE model after a quarter of the budget
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                              constant_liar=shared)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "gp":
            _need("scipy", "gp")
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
        if name == "cmaes":
            _need("cmaes", "cmaes")
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    raise ConfigError(f"--sampler {name!r}; valid: {', '.join(SAMPLERS)}")


class CompletedSnapshot(optuna.pruners.BasePruner):
    """An Optuna pruner whose reads of the study's COMPLETE trials come from a snapshot, not from the storage.

    Optuna's :class:`~optuna.pruners.MedianPruner` asks the storage for every completed trial at each
    ``should_prune``; with an RDB storage that re-reads the running trials too (≈ 3–5 ms a call on SQLite here,
    ten calls a trial). Completed trials never change, so the answer only grows when a trial finishes: the
    trials this process finishes are added as Optuna hands them to the study's callbacks (:meth:`observe`, no
    read), and the snapshot is read again from the storage only when it is older than :data:`SNAPSHOT_SECONDS`,
    for the trials other workers finished. With one process the decisions are exactly the wrapped pruner's;
    with several, a trial finished by another process joins the comparison at most that many seconds late.
    Every other study access (other states, the direction) goes to the study itself.
    """

    def __init__(self, pruner: optuna.pruners.BasePruner) -> None:
        self.pruner = pruner
        self._study: int | None = None
        self._taken = -math.inf
        self._completed: dict[int, optuna.trial.FrozenTrial] = {}

    def observe(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A study callback: a trial this process just finished joins the snapshot when it completed."""
        if id(study) == self._study and trial.state == TrialState.COMPLETE:
            self._completed[trial.number] = trial

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        now = time.monotonic()
        if id(study) != self._study or now - self._taken > SNAPSHOT_SECONDS:
            self._completed = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
            self._study, self._taken = id(study), now
        return self.pruner.prune(_SnapshotStudy(study, list(self._completed.values())), trial)


class _SnapshotStudy:
    """``study`` with ``get_trials(states=(COMPLETE,))`` answered from a snapshot (see :class:`CompletedSnapshot`)."""

    def __init__(self, study: optuna.Study, completed: list[optuna.trial.FrozenTrial]) -> None:
        self._study, self._completed = study, completed

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[optuna.trial.FrozenTrial]:
        if states is not None and tuple(states) == (TrialState.COMPLETE,):
            return copy.deepcopy(self._completed) if deepcopy else list(self._completed)
        return self._study.get_trials(deepcopy=deepcopy, states=states)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def _need(module: str, sampler: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--sampler {sampler} needs the {module} package; pip install 'precondtune[samplers]'")


def judged_from(schedule: Schedule, report_every: int) -> int:
    """The first step a pruner judges: :data:`PRUNE_AFTER` of the steps, never during the lr warmup (early
    losses say little about the end) and not before the first report. Reports before it are not written to the
    storage (no pruner reads them; each is a commit); the trial's result keeps every report."""
    return max(schedule.warmup_steps, report_every, math.ceil(PRUNE_AFTER * schedule.steps))


def make_pruner(name: str, schedule: Schedule, report_every: int) -> optuna.pruners.BasePruner:
    """Median or successive halving, judging from :func:`judged_from` on."""
    warm = judged_from(schedule, report_every)
    if name == "median":
        return CompletedSnapshot(optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warm,
                                                             interval_steps=1))
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=warm, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {name!r}; valid: {', '.join(PRUNERS)}")


def model_identity(mf: ModelFile) -> str:
    """The model file's contents and factory, hashed: the same on every machine of a distributed study, and
    different for another file of the same name or an edited one."""
    digest = hashlib.sha256(mf.path.read_bytes())
    digest.update(f"\0{mf.factory_name}".encode())
    return digest.hexdigest()[:16]


def adamw_options(adamw: AdamWReference | None) -> str:
    """``--adam-*`` options as typed, or "" without ``--adam-lr``."""
    if adamw is None:
        return ""
    return (f"--adam-lr {adamw.lr!r} --adam-betas {adamw.betas[0]!r},{adamw.betas[1]!r} "
            f"--adam-weight-decay {adamw.weight_decay!r}")


def _study_attrs(mf: ModelFile, settings: SearchSettings, spec: OptimizerSpec, params: int) -> dict[str, Any]:
    return {"optimizer": spec.name, "model": str(mf.path), "model_identity": model_identity(mf),
            "trainable_parameters": params,
            "trial_settings": {"steps": settings.steps, "batch_size": settings.batch_size, "seed": settings.seed,
                               "warmup": settings.schedule().warmup_steps, "decay": settings.decay},
            "set": sorted(settings.fixed), "adamw": _adamw_attr(settings.adamw)}


def _adamw_attr(adamw: AdamWReference | None) -> dict[str, Any] | None:
    return None if adamw is None else {"lr": adamw.lr, "betas": list(adamw.betas), "weight_decay": adamw.weight_decay}


def _adamw_of(attr: dict[str, Any] | None) -> AdamWReference | None:
    return None if attr is None else AdamWReference(lr=attr["lr"], betas=tuple(attr["betas"]),  # type: ignore[arg-type]
                                                    weight_decay=attr["weight_decay"])


def _mismatch(name: str, url: str, old: dict[str, Any], attrs: dict[str, Any]) -> str | None:
    """Why the study ``name`` (user attrs ``old``) cannot take this run's trials (``attrs``), or None. Attrs an
    earlier release did not write are not compared."""
    where = f"study {name!r} in {url}"
    fix = "use another --study-name, or rerun with the study's own"
    if "optimizer" in old and old["optimizer"] != attrs["optimizer"]:
        return f"{where} was made for optimizer {old['optimizer']} (this run: {attrs['optimizer']}); {fix} --optimizer"
    if "model_identity" in old and old["model_identity"] != attrs["model_identity"]:
        same = Path(str(old.get("model"))).resolve() == Path(attrs["model"]).resolve()
        then = f"{old.get('model')} as it was then (it has changed since)" if same else \
            f"another model file, {old.get('model')} (this run: {attrs['model']})"
        return f"{where} was made for {then}; its trials do not compare with this model's: {fix} model file"
    if "trainable_parameters" in old and old["trainable_parameters"] != attrs["trainable_parameters"]:
        return (f"{where} was made for a model with {old['trainable_parameters']:,} trainable parameters, "
                f"{old.get('model')} (this run: {attrs['trainable_parameters']:,}, {attrs['model']}); {fix} model")
    if "trial_settings" in old and old["trial_settings"] != attrs["trial_settings"]:
        return (f"{where} was made for trial settings {old['trial_settings']} (this run: {attrs['trial_settings']}); "
                f"{fix} settings")
    if "adamw" in old and old["adamw"] != attrs["adamw"]:
        made, now = (adamw_options(_adamw_of(v)) or "no --adam-lr" for v in (old["adamw"], attrs["adamw"]))
        return (f"{where} was made with {made} (this run: {now}): the transfer sets the learning-rate range and "
                f"convention of its trials; {fix} --adam-* options")
    return None


def _set_note(study: optuna.Study, name: str, settings: SearchSettings) -> str | None:
    """A note when this run's ``--set`` differs from the one the study was made with (allowed: narrowing a search
    is a use of --set, but the trials then share one table and one sampler history)."""
    earlier, now = study.user_attrs.get("set"), sorted(settings.fixed)
    if earlier is None or earlier == now or settings.trials == 0:
        return None
    made, adds = (" ".join(f"--set {i}" for i in items) or "no --set" for items in (earlier, now))
    return (f"study {name} was made with {made} and this run adds trials with {adds}; they share one table and one "
            "sampler history (another --study-name keeps the searches apart)")


def _scale_note(obj: Objective) -> str | None:
    """A note when ``--set scale=…`` changes the learning-rate convention the searched lr range was made for: the
    range follows the base config (Muon's own defaults, or the ``--adam-*`` transfer's convention)."""
    if "scale" not in obj.fixed_fields or "lr" in obj.fixed_fields or "lr" in obj.fixed_params:
        return None
    base = obj.base or obj.spec.default_config()
    scale = obj.fixed_fields["scale"]
    if getattr(base, "scale", scale) == scale:
        return None
    lr = obj.knobs.params.get("lr")
    where = f" ({_describe(lr)})" if lr is not None else ""
    return (f"--set scale={scale}: the searched lr range{where} was made for scale={base.scale}, where the same lr "
            f"moves the weights differently; pass --adam-lr (scale=match_rms_adamw takes AdamW's lr) or --set lr=…")


def open_study(ref: StorageRef, name: str, attrs: dict[str, Any], sampler: Any, pruner: Any, *,
               create: bool = True) -> optuna.Study:
    """Load ``name`` (checking it was made for this optimizer, model and trial settings) or, with ``create``,
    create it."""
    try:
        ref.storage.get_study_id_from_name(name)
        existing = True
    except KeyError:
        existing = False
    except Exception as e:
        raise ConfigError(f"--storage {ref.url}: cannot read it ({_one_line(e)})") from e
    if not existing and not create:
        raise ConfigError(f"there is no study {name!r} in {ref.url} to show (--trials 0 adds nothing); check "
                          "--study-name and --storage, or run with --trials N to start it")
    if existing:
        study = optuna.load_study(study_name=name, storage=ref.storage, sampler=sampler, pruner=pruner)
        why = _mismatch(name, ref.url, study.user_attrs, attrs)
        if why is not None:
            raise ConfigError(why)
        return study
    study = optuna.create_study(storage=ref.storage, study_name=name, direction="minimize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


def _field_backed(param: str, knobs: Knobs) -> bool:
    """Whether ``--set param=…`` also overrides a Config field, so it holds for exact warm starts anyway
    (``one_minus_beta1/2`` through ``betas``, see :meth:`Objective.config`)."""
    inner = param.removeprefix("one_minus_")
    return param in knobs.fields or inner in knobs.fields or param in ("one_minus_beta1", "one_minus_beta2")


def interrupted(t: optuna.trial.FrozenTrial) -> bool:
    """Whether ``t`` was failed by a Ctrl-C (re-run on resume)."""
    return t.state == TrialState.FAIL and str(t.user_attrs.get("fail_reason", "")).startswith(INTERRUPTED)


def _enqueue_warm_starts(study: optuna.Study, obj: Objective, settings: SearchSettings) -> None:
    """Defaults and the AdamW transfer first, then each ``--enqueue``; a start already in the study is skipped."""
    spec, knobs = obj.spec, obj.knobs
    starts: list[tuple[str, dict[str, Any], dict[str, Any] | None, dict[str, Any]]] = []
    configs = [("defaults", spec.default_config())]
    if obj.base is not None:
        configs.append(("adamw-transfer", obj.base))
    for label, config in configs:
        implied = knobs.params_of(config)
        # a --set knob that is only a trial param (Muon's ns_schedule, Adafactor's momentum) and that this config
        # does not provably match: run the config's params with the --set value instead of the exact config, so
        # --set holds for every trial
        clash = any(not _field_backed(k, knobs) and implied.get(k, object()) != v for k, v in obj.fixed_params.items())
        starts.append((label, implied, None if clash else _jsonable(config_dict(config)), {}))
    for item in settings.enqueue:
        params, fields = knobs.resolve(parse_assignments(item, option="--enqueue"), option="--enqueue")
        clipped = {k: _clip(knobs.params[k], v) for k, v in params.items()}
        starts.append((f"--enqueue {item}", clipped, None, _jsonable(fields)))

    def key(config: Any, overrides: Any, params: dict[str, Any]) -> str:
        # an exact start is the same start whatever params it recorded (older studies lack newer knobs)
        return json.dumps([config, overrides, params if config is None else None], sort_keys=True, default=str)

    # a start that ran, runs or waits is not queued again — unless a Ctrl-C stopped it (a killed one is re-run by
    # the heartbeat check); an --enqueue start is known by the params it was queued with, not by all it sampled
    seen = {key(t.user_attrs.get("enqueued_config"), t.user_attrs.get("overrides", {}),
                t.user_attrs.get("enqueued_params", t.params))
            for t in study.get_trials(deepcopy=False) if "enqueued" in t.user_attrs and not interrupted(t)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, params, config, overrides in starts:
            params = {k: v for k, v in params.items() if k not in obj.fixed_params}
            k = key(config, overrides, params)
            if k in seen:
                continue
            seen.add(k)
            attrs: dict[str, Any] = {"enqueued": label, "overrides": overrides}
            if config is not None:
                attrs["enqueued_config"] = config
            else:
                attrs["enqueued_params"] = params
            study.enqueue_trial(params, user_attrs=attrs)


def _worker(model: str, settings: SearchSettings, study_name: str, n_trials: int, index: int, threads: int,
            existing: int) -> None:
    """One extra ``--workers`` process: its share of the new trials on the same study. What the model file prints
    goes to stderr: the parent's stdout may be carrying a ``--json`` document."""
    sys.stdout = sys.stderr
    stopping.install()
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    child = multiprocessing.parent_process() is not None  # a --workers process; tests call this in-process
    code = 0
    try:
        mf = load_model_file(model)
        obj = Objective(mf, settings)
        ref = open_storage(settings.storage, workers=settings.workers)
        sampler = make_sampler(settings.sampler, _sampler_seed(settings.seed, index, existing, ref.url),
                               settings.trials)
        study = optuna.load_study(study_name=study_name, storage=ref.storage, sampler=sampler,
                                  pruner=make_pruner(settings.pruner, obj.schedule, settings.report_every))
        with stopping.deferred():
            study.optimize(obj, n_trials=n_trials, timeout=settings.timeout, catch=(Exception,),
                           callbacks=[*_observers(study.pruner), _stop_without_parent, _between_trials])
    except KeyboardInterrupt as e:  # Ctrl-C reaches the whole process group; the parent reports it in one line
        code = 143 if isinstance(e, Terminated) else 130
    except Exception:
        if not child:  # the caller sees the error
            raise
        traceback.print_exc()  # what multiprocessing prints for an error in a child, then the exit below
        code = 1
    if child:
        stopping.exit_process(code, note=False)  # the parent names any thread the model file left running
    if code:
        sys.exit(code)


def _between_trials(_study: optuna.Study, _trial: Any) -> None:
    """A study callback: a Ctrl-C/SIGTERM that came while the trial was being told stops the search here."""
    stopping.check()


def _stop_without_parent(study: optuna.Study, _trial: Any) -> None:
    """A ``--workers`` process whose parent is gone (killed) starts no further trial."""
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        study.stop()


def check_enqueue(knobs: Knobs, fixed_items: Sequence[str], enqueue_items: Sequence[str]) -> None:
    """Each ``--enqueue`` item's knobs and values are valid, and none contradicts a ``--set`` (which holds for
    every trial, warm starts included)."""
    fixed = merge_sets(fixed_items)
    for item in enqueue_items:
        values = parse_assignments(item, option="--enqueue")
        knobs.resolve(values, option="--enqueue")
        clash = next((k for k, v in values.items() if k in fixed and fixed[k] != v), None)
        if clash is not None:
            raise ConfigError(f"--enqueue {item}: {clash}={values[clash]!r} contradicts --set {clash}={fixed[clash]!r}, "
                              "which holds for every trial; drop one of them")


def _check_hook(obj: Objective, model: torch.nn.Module, data: TrialData) -> None:
    """Build the study's starting config once — paying torch's one-time lazy imports (torch.optim loads
    torch._dynamo, ≈ 1 s on CPU) here, not in trial 0 — and run the training-loop hook it needs (Sophia's Hessian
    estimate) on the first batch: what the model file lacks for it (``logits_fn``) stops the search before a study
    is written. A config that cannot build or step fails its trials instead, each with the reason."""
    hp = {**config_dict(obj.base or obj.spec.default_config()), **obj.fixed_fields}
    try:
        opt = build(obj.spec.name, model, routing=obj.routing, **hp)
        hook = find_hook(opt)
        if hook is not None:
            batch = move_to(data.batches[0], data.device)
            hook(opt, model, batch, obj.mf.raw_loss, obj.mf.logits_fn)
    except PrecondtuneError:
        raise
    except Exception:
        pass


def _fail_stale_trials(study: optuna.Study) -> int:
    """Fail the RUNNING trials whose heartbeat went stale (a killed run's), which queues each one's config again
    once, before this run counts its trials; returns how many such re-runs wait in the study."""
    if not is_heartbeat_enabled(study._storage):
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    return sum("failed_trial" in t.system_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def is_shared(ref: StorageRef, workers: int) -> bool:
    """Whether trials of a study may run in several processes at once: ``--workers N``, or a storage made for
    sharing (PostgreSQL/MySQL across machines, a journal file on NFS). One process on an SQLite file or in
    memory is alone."""
    local = ref.kind == "memory" or (ref.kind == "rdb" and ref.url.startswith("sqlite"))
    return workers > 1 or not local


def _observers(pruner: optuna.pruners.BasePruner) -> list[Callable[[optuna.Study, Any], None]]:
    """Study callbacks that keep ``pruner`` told of the trials this process finishes."""
    observe = getattr(pruner, "observe", None)  # CompletedSnapshot's
    return [observe] if observe is not None else []


def _sampler_seed(seed: int, worker: int, existing: int, url: str = "") -> int:
    """Distinct random streams per worker and per resumption (``existing`` trials), so no two processes
    re-propose the same random points. On a server storage (PostgreSQL, MySQL) the same command may run on
    several machines at once, so the host name is mixed in too."""
    host = zlib.crc32(socket.gethostname().encode()) if url.split(":", 1)[0].startswith(("postgres", "mysql")) \
        else 0
    return (seed * 1_000_003 + worker * 7_919 + existing * 31 + host) % 2**31


@dataclass
class SearchResult:
    """What ``tune`` reports."""

    study: str
    storage: str
    optimizer: str
    model: str
    best_value: float | None
    best_hyperparameters: dict[str, Any] | None
    best_trial: int | None
    counts: dict[str, int]
    new: dict[str, int]
    frame: pd.DataFrame
    steps: int
    steps_saved_by_pruning: int
    seed_runs: dict[int, list[float]] = field(default_factory=dict)
    first_failure: str | None = None

    def as_json(self, top: int = 10) -> dict[str, Any]:
        """SPEC.md's ``tune --json``; ``top``: the first ``top`` rows of :attr:`frame` (complete trials best first,
        then pruned and failed ones with their reasons), as the table shows them."""
        best: dict[str, Any] = {"value": self.best_value, "hyperparameters": self.best_hyperparameters,
                                "trial": self.best_trial}
        if self.best_trial is not None and self.best_trial in self.seed_runs:
            values = self.seed_runs[self.best_trial]
            best["seed_values"] = values
            best["seed_spread"] = _spread(values)
        rows = self.frame.head(top)
        return {"study": self.study, "storage": self.storage, "optimizer": self.optimizer, "model": self.model,
                "best": best, "trials": self.counts, "new_trials": self.new, "steps": self.steps,
                "steps_saved_by_pruning": self.steps_saved_by_pruning, "first_failure": self.first_failure,
                "top": [{k: _unjson(v) for k, v in row.items()} for row in json.loads(rows.to_json(orient="records"))]}


def _unjson(v: Any) -> Any:
    """The frame keeps list/dict hyperparameters as JSON text (one CSV cell each); JSON output gets them back."""
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _spread(values: list[float]) -> dict[str, float | None]:
    finite = [v for v in values if math.isfinite(v)]
    return {"median": statistics.median(values) if values else None, "min": min(finite, default=None),
            "max": max(finite, default=None), "stdev": statistics.stdev(finite) if len(finite) > 1 else 0.0}


def _measured(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """What the trial's run measured (:data:`RESULT_ATTR`; studies written by precondtune 0.1.0 kept each
    measurement as its own user attr)."""
    return t.user_attrs.get(RESULT_ATTR) or t.user_attrs


def hyperparameters_of(t: optuna.trial.FrozenTrial | optuna.Trial) -> dict[str, Any] | None:
    """The full Config a trial ran (in its :data:`RESULT_ATTR`; earlier studies kept it as the
    ``hyperparameters`` attr); None for a trial killed before it ended, or one not yet run."""
    hp = _measured(t).get("hyperparameters")
    return hp if hp is not None else t.user_attrs.get("hyperparameters")


def pruned_reason_of(t: optuna.trial.FrozenTrial) -> str | None:
    """Why a pruned trial was stopped (in its :data:`RESULT_ATTR`; earlier studies kept a ``pruned_reason``
    attr)."""
    return _measured(t).get("pruned_reason") or t.user_attrs.get("pruned_reason")


def trials_frame(study: optuna.Study, seed_runs: dict[int, list[float]] | None = None) -> pd.DataFrame:
    """One row per finished trial, best first: state, value, reason, timing and every hyperparameter."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        ua, measured = t.user_attrs, _measured(t)
        row: dict[str, Any] = {
            # value: the eval loss, of complete trials only (Optuna gives a pruned trial its last report, a mean
            # training loss, as its value: that is last_report here)
            "number": t.number, "state": t.state.name, "value": t.value if t.state == TrialState.COMPLETE else None,
            "last_report": t.value if t.state == TrialState.PRUNED else None,
            "reason": pruned_reason_of(t) or ua.get("fail_reason") or (STOPPED if t.state == TrialState.FAIL
                                                                        else ""),
            "enqueued": ua.get("enqueued", ""), "steps_run": measured.get("steps_run"),
            "median_step_seconds": measured.get("median_step_seconds"),
            "train_seconds": measured.get("train_seconds"), "trial_seconds": measured.get("trial_seconds"),
        }
        if seed_runs and t.number in seed_runs:
            s = _spread(seed_runs[t.number])
            row.update({"seed_median": s["median"], "seed_min": s["min"], "seed_max": s["max"]})
        for k, v in (hyperparameters_of(t) or {}).items():
            row[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["number", "state", "value", "last_report", "reason"])
    key = frame["seed_median"].fillna(math.inf) if "seed_median" in frame else \
        frame["value"].astype(float).fillna(frame["last_report"].astype(float))
    order = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2}
    return (frame.assign(_s=frame["state"].map(order).fillna(3), _k=key)
            .sort_values(["_s", "_k", "number"]).drop(columns=["_s", "_k"]).reset_index(drop=True))


def _rerun_seeds(obj: Objective, study: optuna.Study, settings: SearchSettings) -> dict[int, list[float]]:
    """Re-run the best :data:`TOP_FOR_SEEDS` configs on seeds seed+1 … seed+K−1 (the search's own run is seed)."""
    done = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
                  key=lambda t: t.value)[:TOP_FOR_SEEDS]
    stored = {int(k): v for k, v in study.user_attrs.get("seed_runs", {}).items()}
    runs: dict[int, list[float]] = {}
    datas = {}
    try:
        with stopping.deferred():
            for t in done:
                values = [float(t.value)]
                for s in range(settings.seed + 1, settings.seed + settings.seeds):
                    mine = stored.get(t.number, {})
                    cached = (math.inf if mine[str(s)] is None else mine[str(s)]) if str(s) in mine else None
                    if cached is None:
                        if s not in datas:
                            datas[s] = prepare(obj.mf, steps=settings.steps, batch_size=settings.batch_size, seed=s,
                                               device=obj.data.device)
                        try:
                            r = train(datas[s], obj.spec.name, hyperparameters_of(t),
                                      schedule=obj.schedule, routing=obj.routing)
                            cached = r.eval_loss if r.eval_loss is not None else math.inf
                        except Exception:  # noqa: BLE001 - a seed that crashes counts as a diverged run
                            cached = math.inf
                        stored.setdefault(t.number, {})[str(s)] = cached
                    values.append(float(cached))
                runs[t.number] = values
    finally:  # stopped by Ctrl-C/SIGTERM: the seed runs finished so far are kept for the resumed run
        study.set_user_attr("seed_runs", {str(k): {s: (v if math.isfinite(v) else None) for s, v in d.items()}
                                          for k, d in stored.items()})
    return runs


class _Tally:
    """This run's finished trials and the study's best value, for the progress callback. :meth:`sync` reads the
    storage (≈ 2.5 ms on SQLite); :meth:`add` counts a trial this process just told, without a read."""

    def __init__(self, before: dict[int, TrialState]) -> None:
        self.before = before
        self.states: dict[int, TrialState] = {}
        self.best: float | None = None
        self.synced = False

    def sync(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        self.states = {t.number: t.state for t in trials if t.state.is_finished() and t.number not in self.before}
        values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        self.best = min(values) if values else None
        self.synced = True

    def add(self, trial: optuna.trial.FrozenTrial) -> None:
        self.states[trial.number] = trial.state
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            self.best = trial.value if self.best is None else min(self.best, trial.value)


ProgressFn = Callable[[int, int, float | None, int, int], None]
"""``progress(done, total, best value, pruned, failed)`` over this run's new trials."""


def _own_settings(settings: SearchSettings, name: str) -> tuple[SearchSettings, StorageRef]:
    """``settings`` with the trial settings study ``name`` was made with (unchanged when it has none), and the
    opened storage; a study file that does not exist raises :class:`ConfigError` (``--trials 0`` creates nothing)."""
    url = storage_url(settings.storage)
    if url.startswith("sqlite:///") and not is_memory_url(url) and not Path(url[len("sqlite:///"):]).exists():
        raise ConfigError(f"there is no study {name!r} in {url} to show: the file does not exist (--trials 0 adds "
                          "nothing); check --storage, or run with --trials N to start the study")
    ref = open_storage(settings.storage, workers=settings.workers)
    try:
        attrs = ref.storage.get_study_user_attrs(ref.storage.get_study_id_from_name(name))
    except KeyError:  # no such study: open_study says so
        return settings, ref
    if "adamw" in attrs:  # the fallback AdamW groups of its configs, for --seeds re-runs
        settings = dataclasses.replace(settings, adamw=_adamw_of(attrs["adamw"]))
    stored = attrs.get("trial_settings")
    if not isinstance(stored, dict):
        return settings, ref
    own = dataclasses.replace(settings, **{k: stored[k] for k in TRIAL_SETTINGS if k in stored})
    if own.warmup == dataclasses.replace(own, warmup=None).schedule().warmup_steps:
        own = dataclasses.replace(own, warmup=None)  # stored resolved: the default, as the user left it
    return own, ref


def run_search(mf: ModelFile, settings: SearchSettings, *, progress: ProgressFn | None = None,
               on_study: Callable[[str, str, str, str | None], None] | None = None) -> SearchResult:
    """Run (or resume) the study for ``settings.optimizer`` on ``mf``; see the module docstring."""
    if settings.trials < 0 or settings.workers < 1 or settings.seeds < 1 or settings.steps < 1:
        raise ConfigError("--trials must be >= 0, and --workers, --seeds and --steps >= 1")
    if settings.study_name is not None and not settings.study_name.strip():
        raise ConfigError("--study-name is empty; give a name, or leave the option out for MODEL-OPTIMIZER")
    if settings.optimizer.strip().lower() == "all" or "," in settings.optimizer:
        raise ConfigError(f"--optimizer {settings.optimizer}: tune searches one optimizer; name one, or compare several "
                          "with `precondtune plan MODEL -o NAME,NAME`")
    obj = Objective(mf, settings)  # validates --set, --steps/--warmup/--decay and the optimizer name
    name = settings.study_name or f"{mf.name}-{obj.spec.name}"
    ref: StorageRef | None = None  # opened once the model file has passed its checks, or now for --trials 0
    if settings.trials == 0:  # shown (and --seeds re-run) with the study's own trial settings
        own, ref = _own_settings(settings, name)
        if own != settings:
            settings, obj = own, Objective(mf, own)
    pruner = make_pruner(settings.pruner, obj.schedule, settings.report_every)
    make_sampler(settings.sampler, 0, settings.trials)  # a missing sampler package fails before anything is written
    check_enqueue(obj.knobs, settings.fixed, settings.enqueue)
    data = obj.data
    model = copy.deepcopy(data.template).to(data.device)
    mf.check_first_step(model, move_to(data.batches[0], data.device))
    _check_hook(obj, model, data)
    del model
    _, trainable = count_parameters(data.template)
    ref = ref or open_storage(settings.storage, workers=settings.workers)
    attrs = _study_attrs(mf, settings, obj.spec, trainable)
    study = open_study(ref, name, attrs, None, pruner, create=settings.trials > 0)
    retries = _fail_stale_trials(study) if settings.trials > 0 else 0
    # trials this run did not start: finished ones, and RUNNING ones (another worker's, or a killed run's that
    # the heartbeat check will fail) — none of them counts as this run's new trials
    before = {t.number: t.state for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING}
    study.sampler = make_sampler(settings.sampler, _sampler_seed(settings.seed, 0, len(before), ref.url),
                                 settings.trials, shared=is_shared(ref, settings.workers))
    if on_study is not None:
        notes = [n for n in (_set_note(study, name, settings), _scale_note(obj)) if n]
        on_study(name, ref.url, resume_options(settings), "; ".join(notes) or None)
    if settings.trials > 0:  # --trials 0 shows the study as it is and adds nothing to it
        _enqueue_warm_starts(study, obj, settings)

    total = settings.trials + retries  # a killed run's trial re-run by the heartbeat check is not a new trial
    shares = [total // settings.workers + (k < total % settings.workers) for k in range(settings.workers)]
    procs = []
    if settings.workers > 1:
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, torch.get_num_threads() // settings.workers)
        torch.set_num_threads(threads)
        spec_str = str(mf.path) + (f":{mf.factory_name}" if mf.factory_name else "")
        for k in range(1, settings.workers):
            if shares[k]:
                p = ctx.Process(target=_worker, args=(spec_str, settings, name, shares[k], k, threads, len(before)),
                                daemon=False)
                p.start()
                procs.append(p)

    tally = _Tally(before)

    def tick(study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> None:
        if progress is None:
            return
        if trial is not None and not procs and tally.synced:
            tally.add(trial)  # one process: its own trial is all that changed since the last call
        else:
            tally.sync(study)  # first call, or other workers' trials
        progress(len(tally.states), total, tally.best,
                 sum(st == TrialState.PRUNED for st in tally.states.values()),
                 sum(st == TrialState.FAIL for st in tally.states.values()))

    tick(study, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if shares[0]:
                with stopping.deferred():
                    study.optimize(obj, n_trials=shares[0], timeout=settings.timeout, catch=(Exception,),
                                   callbacks=[*_observers(pruner), tick, _between_trials])
            for p in procs:
                while p.is_alive():
                    p.join(timeout=1.0)
                    tick(study, None)
        except Terminated:  # Ctrl-C reaches the workers from the terminal; a SIGTERM to this process is passed on
            for p in procs:
                if p.is_alive():
                    p.terminate()
            raise
        finally:
            for p in procs:
                if p.is_alive():
                    p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise PrecondtuneError(f"{len(bad)} worker process(es) exited with code {bad[0]}; rerun with --workers 1 "
                               "--debug to see why")
    tick(study, None)
    seed_runs = _rerun_seeds(obj, study, settings) if settings.seeds > 1 else {}
    return _result(study, name, ref.url, obj, settings, before, seed_runs)


def _fp16_hint(obj: Objective) -> str:
    """Why every trial may diverge: a model kept in fp16, where AdamW-style eps (1e-8) and small updates vanish."""
    data = obj._data
    params = [p for p in data.template.parameters() if p.is_floating_point()] if data is not None else []
    if params and all(p.dtype == torch.float16 for p in params):
        return ("; the model's parameters are fp16, where an eps of 1e-8 and small updates underflow: train in bf16 "
                "or fp32 (mixed precision keeps fp32 weights)")
    return ""


def _result(study: optuna.Study, name: str, url: str, obj: Objective, settings: SearchSettings,
            before: dict[int, TrialState], seed_runs: dict[int, list[float]]) -> SearchResult:
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    counts = {"complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
              "failed": states.count(TrialState.FAIL), "running": states.count(TrialState.RUNNING),
              "waiting": states.count(TrialState.WAITING)}
    new_states = [t.state for t in trials if t.state.is_finished() and t.number not in before]
    new = {"complete": new_states.count(TrialState.COMPLETE), "pruned": new_states.count(TrialState.PRUNED),
           "failed": new_states.count(TrialState.FAIL)}
    saved = sum(max(0, settings.steps - int(_measured(t)["steps_run"] or 0))
                for t in trials if t.state == TrialState.PRUNED and _measured(t).get("steps_run") is not None)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if seed_runs:
        best_no = min(seed_runs, key=lambda n: (statistics.median(seed_runs[n]), n))
        best = next(t for t in complete if t.number == best_no)
    elif complete:
        best = min(complete, key=lambda t: (t.value, t.number))
    failure = next((t.user_attrs.get("fail_reason") for t in trials if t.state == TrialState.FAIL
                    and t.user_attrs.get("fail_reason")), None)
    diverged = [str(r) for t in trials if t.state == TrialState.PRUNED
                and str(r := pruned_reason_of(t) or "").startswith("diverged")]
    if not complete and failure is None and diverged and len(diverged) == sum(t.state.is_finished() for t in trials):
        failure = f"{diverged[0]} (every trial diverged{_fp16_hint(obj)})"
    value = None
    if best is not None:
        value = statistics.median(seed_runs[best.number]) if seed_runs else best.value
    return SearchResult(
        study=name, storage=url, optimizer=obj.spec.name, model=str(obj.mf.path), best_value=value,
        best_hyperparameters=hyperparameters_of(best) if best else None,
        best_trial=best.number if best else None, counts=counts, new=new, frame=trials_frame(study, seed_runs),
        steps=settings.steps, steps_saved_by_pruning=saved, seed_runs=seed_runs, first_failure=failure)
