"""``precondtune plan``: profile → memory → overhead → searches → ranking → one recommended config.

1. profile the model (parameters by role, forward+backward FLOPs, measured step time) and the hardware;
2. memory per optimizer (:mod:`.memory`): those that do not fit are dropped, with by how much;
3. compute overhead per optimizer (:mod:`.flops`): counted, amortized; measured during the searches;
4. a short Optuna search (:mod:`.search`) per candidate, warm-started from the AdamW transfer, and AdamW itself
   searched with the same budget — the honest baseline;
5. ranking: the best config of each optimizer re-run on ``seeds`` seeds, at equal wall-clock by default (each
   optimizer gets the number of steps it fits into the time AdamW's run took, with the full schedule over those
   steps, from the step times measured in its search) or at equal steps; the winner must beat AdamW by more than
   the seed spread of either, else AdamW is recommended;
6. outputs (:mod:`.report`): ``recommended.yaml``, ``report.md``, PNG plots and ``results.csv``.

Studies live in an Optuna storage; rerunning with the same ``--storage`` reuses finished trials (a study is
topped up to ``--trials``, never re-run).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from . import optim as po
from .dtypes import dtype_name, parse_dtype
from .errors import ConfigError, PrecondtuneError
from .flops import flops_report, measure_step_times
from .hardware import resolve_profile
from .inventory import inventory
from .memory import MemorySettings, plan_memory
from .modelfile import ModelFile
from .profiling import Profile, profile_model, resolve_device
from .search import (
    AdamWReference,
    Knobs,
    Objective,
    SearchResult,
    SearchSettings,
    check_enqueue,
    check_storage,
    fallback_routing,
    interrupted,
    is_memory_url,
    model_identity,
    open_storage,
    parse_assignments,
    run_search,
    storage_url,
)
from .training import Schedule, TrainResult, prepare, train
from .units import human_bytes

RANK_BY = ("time", "steps")
DEFAULT_TRIALS = 4
DEFAULT_STEPS = 100
DEFAULT_SEEDS = 2
DEFAULT_BATCH_SIZE = 16
OUTPUT_NAMES = ("recommended.yaml", "recommended.json", "report.md", "results.csv", "memory.png", "overhead.png",
                "loss_curves.png", "search_history.png")
"""Every file ``write_outputs`` may write into the output directory."""
MIN_RANK_STEPS = 5
"""An optimizer whose equal-time budget is below this many steps is still ranked on its budget, never more (that
would hand it time AdamW did not get), with a note that so short a run says little."""


@dataclass(frozen=True, kw_only=True)
class PlanSettings:
    """What to compare and how long to search."""

    optimizers: str = "all"
    batch_size: int = DEFAULT_BATCH_SIZE
    trials: int = DEFAULT_TRIALS
    steps: int = DEFAULT_STEPS
    seeds: int = DEFAULT_SEEDS
    rank_by: str = "time"
    storage: str | None = None
    study_prefix: str | None = None
    workers: int = 1
    timeout: float | None = None
    device: str = "auto"
    gpu: str | None = None
    reserve_gb: float | None = None
    world_size: int = 1
    sharding: str = "none"
    bucket_view: bool = False
    """DDP with ``gradient_as_bucket_view=True`` (``MemorySettings.bucket_view``)."""
    param_dtype: str | None = None
    state_dtype: str | None = None
    adamw: AdamWReference | None = None
    seed: int = 0
    fixed: tuple[str, ...] = ()
    """``--set [NAME:]KEY=VALUE`` items."""
    enqueue: tuple[str, ...] = ()
    """``--enqueue [NAME:]KEY=VALUE[,...]`` items."""

    def __post_init__(self) -> None:
        if self.rank_by not in RANK_BY:
            raise ConfigError(f"--rank-by {self.rank_by!r}; valid: {', '.join(RANK_BY)}")
        if self.study_prefix is not None and not self.study_prefix.strip():
            raise ConfigError("--study-name is empty; give a prefix, or leave the option out for plan-MODEL")
        for name, low in (("trials", 1), ("steps", 1), ("seeds", 1), ("batch_size", 1), ("workers", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range; allowed: >= {low}")


@dataclass
class Candidate:
    """One optimizer through the pipeline."""

    name: str
    memory: dict[str, Any]
    cost: dict[str, Any] | None = None
    search: SearchResult | None = None
    hyperparameters: dict[str, Any] | None = None
    step_seconds: float | None = None
    rank_steps: int | None = None
    rank_losses: list[float] = field(default_factory=list)
    curve: list[float] = field(default_factory=list)
    curve_seconds: list[float] = field(default_factory=list)
    status: str = "pending"
    note: str = ""

    @property
    def fits(self) -> bool:
        return bool(self.memory.get("fits"))

    @property
    def median(self) -> float | None:
        finite = [v for v in self.rank_losses if math.isfinite(v)]
        return statistics.median(finite) if finite and len(finite) == len(self.rank_losses) else None

    @property
    def spread(self) -> float:
        """Range (max − min) of the seed losses: the noise this comparison can resolve."""
        finite = [v for v in self.rank_losses if math.isfinite(v)]
        return max(finite) - min(finite) if len(finite) > 1 else 0.0


@dataclass
class PlanResult:
    """Everything ``plan`` found; :mod:`.report` renders it."""

    mf: ModelFile
    settings: PlanSettings
    profile: Profile
    memory: dict[str, Any]
    flops: dict[str, Any]
    candidates: list[Candidate]
    storage: str | None
    winner: str | None
    reason: str
    meta: bool
    seconds: float = 0.0
    command: str = ""
    timing_warning: str | None = None
    """Set when the two timing passes disagreed (:func:`measure_side_by_side`)."""
    dtype_note: str | None = None
    """Set when ``--param-dtype``/``--state-dtype`` differ from what the searches trained (:func:`_dtype_note`)."""

    @property
    def by_name(self) -> dict[str, Candidate]:
        return {c.name: c for c in self.candidates}

    def frame(self) -> pd.DataFrame:
        """Every trial of every study, one row each (``results.csv``)."""
        frames = [c.search.frame.assign(optimizer=c.name, study=c.search.study)
                  for c in self.candidates if c.search is not None and not c.search.frame.empty]
        if not frames:
            return pd.DataFrame(columns=["optimizer", "study", "number", "state", "value", "reason"])
        df = pd.concat(frames, ignore_index=True)
        first = ["optimizer", "study", "number", "state", "value", "reason"]
        return df[first + [c for c in df.columns if c not in first]]


Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


def per_optimizer(items: tuple[str, ...], names: list[str], option: str) -> dict[str, tuple[str, ...]]:
    """Split ``--set``/``--enqueue`` items by optimizer: ``NAME:...`` goes to NAME; a bare item goes to every
    planned optimizer whose search space has all its keys (and is an error when none has them)."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for item in items:
        prefix, sep, rest = item.partition(":")
        if sep and "=" not in prefix:
            target = po.get_spec(prefix).name
            if target not in out:
                raise ConfigError(f"{option} {item!r}: {target} is not among the planned optimizers ({', '.join(names)})")
            out[target].append(rest)
            continue
        keys = set(parse_assignments(item, option=option))
        hit = [n for n in names if keys <= set(Knobs.of(po.get_spec(n)).valid())]
        if not hit:
            raise ConfigError(f"{option} {item!r}: no planned optimizer has the knob(s) {', '.join(sorted(keys))}; "
                              f"see `precondtune tune MODEL --optimizer NAME --help` or prefix the item with NAME:")
        for n in hit:
            out[n].append(item)
    return {n: tuple(v) for n, v in out.items()}


def _noop_progress(desc: str, done: int, total: int) -> None:
    return None


def _noop_log(msg: str) -> None:
    return None


def _study_name(settings: PlanSettings, mf: ModelFile, name: str, fixed: tuple[str, ...] = (),
                enqueue: tuple[str, ...] = ()) -> str:
    """``PREFIX-OPTIMIZER-sSTEPS-bBATCH-seedSEED-FINGERPRINT``. The fingerprint hashes what else makes two runs'
    trials comparable — the model file's resolved path, its content and factory, the tuned AdamW given, and this
    optimizer's ``--set``/``--enqueue`` items — so a rerun reuses a study only when they all match (an edited model
    file, a different one called model.py, or a changed ``--set``, starts its own study)."""
    prefix = settings.study_prefix or f"plan-{mf.name}"
    key = json.dumps([str(Path(mf.path).resolve()), model_identity(mf), settings.adamw and dataclasses.asdict(
        settings.adamw), sorted(fixed), sorted(enqueue)], default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{prefix}-{name}-s{settings.steps}-b{settings.batch_size}-seed{settings.seed}-{digest}"


def _counts_toward_trials(t: optuna.trial.FrozenTrial) -> bool:
    """A finished trial, except one failed by a Ctrl-C: an interrupted trial is re-run on resume."""
    return t.state.is_finished() and not interrupted(t)


def _finished_trials(url: str | None, study: str) -> int:
    """Trials already in ``study`` that count toward ``--trials`` (complete, pruned, or failed other than by an
    interrupt); 0 when the study does not exist yet."""
    ref = open_storage(url)
    try:
        s = optuna.load_study(study_name=study, storage=ref.storage)
    except KeyError:
        return 0
    return sum(_counts_toward_trials(t) for t in s.get_trials(deepcopy=False))


TIMED_STEPS = 10
"""Timed steps per optimizer and pass (raised by the timer to cover refresh periods)."""


TIMING_DISAGREEMENT = 1.5
"""Two timing passes of one config further apart than this ratio: the step times are called uncertain."""


def measure_side_by_side(mf: ModelFile, settings: PlanSettings, cands: list[Candidate], device: str,
                         progress: Progress) -> str | None:
    """Amortized seconds per whole training step of each candidate's best config, measured in one stage on one
    batch: two passes in opposite orders, the faster of the two kept (robust to load drifting during the stage).
    Refresh steps are timed on their own and amortized over their period (:func:`flops.measure_step_times`).
    Returns a warning when the passes disagree by more than :data:`TIMING_DISAGREEMENT` for some config (other
    work on the machine), else None."""
    batch = mf.sample_batch(settings.batch_size)
    dev = resolve_device(device)
    best: dict[str, float] = {}
    worst: dict[str, float] = {}
    order = cands + cands[::-1]
    for k, c in enumerate(order):
        progress("timing steps", k, len(order))
        every = int(c.cost["refresh_every"]) if c.cost and c.cost.get("refresh_every") else 0
        m = measure_step_times(mf, c.name, batch=batch, device=dev, steps=TIMED_STEPS, every=every,
                               seed=settings.seed, hyperparameters=po_config(c),
                               routing=fallback_routing(po.get_spec(c.name), settings.adamw))
        best[c.name] = min(best.get(c.name, math.inf), m.amortized_step_seconds)
        worst[c.name] = max(worst.get(c.name, 0.0), m.amortized_step_seconds)
    progress("timing steps", len(order), len(order))
    for c in cands:
        c.step_seconds = best[c.name]
    name = max(best, key=lambda n: worst[n] / best[n] if best[n] > 0 else 1.0, default=None)
    if name is None or best[name] <= 0 or worst[name] / best[name] <= TIMING_DISAGREEMENT:
        return None
    return (f"step times are uncertain: {name} timed {best[name] * 1e3:.1f} and {worst[name] * 1e3:.1f} ms a step in "
            "the two timing passes (other work on the machine?), and the equal-wall-clock steps follow the timings; "
            "rerun on an idle machine, or rank with --rank-by steps")


def _rank_run(mf: ModelFile, settings: PlanSettings, cand: Candidate, steps: int, device: str) -> list[TrainResult]:
    schedule = Schedule(steps)
    runs = []
    for s in range(settings.seed, settings.seed + settings.seeds):
        data = prepare(mf, steps=steps, batch_size=settings.batch_size, seed=s, device=device)
        runs.append(train(data, cand.name, po_config(cand), schedule=schedule,
                          routing=fallback_routing(po.get_spec(cand.name), settings.adamw)))
    return runs


def po_config(cand: Candidate) -> dict[str, Any]:
    """The candidate's best hyperparameters as Config keyword arguments (lists back to tuples)."""
    hp = cand.hyperparameters or {}
    return {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v)
            for k, v in hp.items()}


def decide(candidates: list[Candidate]) -> tuple[str | None, str]:
    """The recommendation and why: the lowest-median optimizer that beats AdamW beyond the seed noise of both
    (which needs at least two seeds to be measured at all), walking the ranking from the top; AdamW when none
    does, or when AdamW itself did not finish its ranking run."""
    ranked = sorted((c for c in candidates if c.median is not None), key=lambda c: c.median)
    if not ranked:
        return None, "no optimizer completed a ranking run"
    best = ranked[0]
    adamw = next((c for c in candidates if c.name == "adamw"), None)
    if adamw is None:
        return best.name, "lowest median eval loss (AdamW was not compared)"
    if adamw.median is None:
        return best.name, (f"lowest median eval loss ({best.median:.4f}); note the AdamW baseline did not finish "
                           f"its ranking run ({adamw.status}{': ' + adamw.note if adamw.note else ''})")
    if best.name == "adamw":
        return "adamw", f"no optimizer beat the tuned AdamW baseline ({adamw.median:.4f})"
    if min(len(adamw.rank_losses), len(best.rank_losses)) < 2:
        return "adamw", (f"{best.name} reached {best.median:.4f} vs AdamW {adamw.median:.4f}, but with one seed the "
                         "noise is unmeasured; rerun with --seeds 2 or more before switching")
    if adamw.spread == 0 and best.spread == 0 and len(set(adamw.rank_losses)) == 1:
        return "adamw", (f"{best.name} reached {best.median:.4f} vs AdamW {adamw.median:.4f}, but every seed gave the "
                         "same loss, so the noise is unmeasured: does the model file fix torch's seed itself (e.g. "
                         "torch.manual_seed in build_model or sample_batch)? Remove that and rerun before switching")
    for c in ranked:
        if c.name == "adamw":
            break
        gain, noise = adamw.median - c.median, max(adamw.spread, c.spread)
        if gain > noise:
            above = "" if c is best else (f"; {best.name} ranked higher ({best.median:.4f}) but its gap was within "
                                          f"the seed spread ({max(adamw.spread, best.spread):.4f})")
            return c.name, (f"median eval loss {c.median:.4f} vs AdamW {adamw.median:.4f} (−{gain:.4f}), more "
                            f"than the seed spread ({noise:.4f}){above}")
    gain, noise = adamw.median - best.median, max(adamw.spread, best.spread)
    return "adamw", (f"{best.name} reached {best.median:.4f} vs AdamW {adamw.median:.4f}, a gap of {gain:.4f} "
                     f"within the seed spread ({noise:.4f}): not a real difference, so AdamW stays")


def _dtype_note(settings: PlanSettings, model: Any) -> str | None:
    """What ``--param-dtype``/``--state-dtype`` change: the memory plan only. The searches, timings and ranking
    train the model as its file builds it, each optimizer keeping its state in the parameters' dtype."""
    own = {p.dtype for p in model.parameters()}
    if settings.state_dtype is None and (settings.param_dtype is None or own == {parse_dtype(settings.param_dtype)}):
        return None
    asked = " ".join(f"{opt} {v}" for opt, v in (("--param-dtype", settings.param_dtype),
                                                   ("--state-dtype", settings.state_dtype)) if v)
    return (f"memory is planned with {asked}; the searches, step timings and ranking train the model as its file "
            f"builds it ({', '.join(sorted(map(dtype_name, own)))} parameters, optimizer state in the same dtype): "
            "build it in the planned dtype in the model file for those to match")


def plan(mf: ModelFile, settings: PlanSettings, *, progress: Progress | None = None,
         log: Log | None = None) -> PlanResult:
    """Run the whole pipeline on ``mf`` (see the module docstring)."""
    progress = progress or _noop_progress
    log = log or _noop_log
    t0 = time.perf_counter()
    names = po.resolve_names(settings.optimizers)
    if "adamw" not in names:
        names = ["adamw", *names]  # the honest baseline is always searched
    fixed = per_optimizer(settings.fixed, names, "--set")
    enqueue = per_optimizer(settings.enqueue, names, "--enqueue")
    # values and the storage are checked before any stage runs (an Objective prepares its data lazily: none here)
    for name in names:
        check = Objective(mf, SearchSettings(optimizer=name, steps=settings.steps, adamw=settings.adamw,
                                             fixed=fixed[name], enqueue=enqueue[name]))
        check_enqueue(check.knobs, fixed[name], enqueue[name])
    mem_kwargs: dict[str, Any] = {"batch_size": settings.batch_size, "gpu": settings.gpu,
                                  "world_size": settings.world_size, "sharding": settings.sharding,
                                  "bucket_view": settings.bucket_view,
                                  "param_dtype": settings.param_dtype, "state_dtype": settings.state_dtype}
    if settings.reserve_gb is not None:
        mem_kwargs["reserve_gb"] = settings.reserve_gb
    check_storage(settings.storage, workers=settings.workers)  # a new SQLite file is made by the searches
    mem_settings = MemorySettings(**mem_kwargs)  # dtypes, world size, sharding
    if mf.eval_batches_fn is not None:
        mf.eval_batches(settings.batch_size)  # one that raises or returns nothing fails now, not at the searches
    if settings.gpu is not None:
        resolve_profile(settings.gpu)

    log("1/5 profiling the model")
    prof = profile_model(mf, batch_size=settings.batch_size, device=settings.device, measure_steps=3,
                         seed=settings.seed)

    log("2/5 memory per optimizer")
    memory = plan_memory(mf, names, mem_settings, progress=progress)
    candidates = [Candidate(e["name"], e) for e in memory["optimizers"]]

    log("3/5 compute overhead per optimizer")
    report = flops_report(mf, names, batch_size=settings.batch_size, device=settings.device, gpu=settings.gpu,
                          seed=settings.seed, progress=progress)
    flops = report.as_json()
    costs = {o["name"]: o for o in flops["optimizers"]}
    for c in candidates:
        c.cost = costs.get(c.name)

    built = mf.build()
    infos = inventory(built)
    dtype_note = _dtype_note(settings, built) if not prof.meta else None
    if dtype_note:
        log("note: " + dtype_note)
    for c in candidates:
        if c.name != "adamw" and not any(a.spec.name == c.name for a in po.route(c.name, infos)):
            c.status = "not applicable"
            c.note = "the model has no parameter of a role it updates; everything would go to AdamW"
        elif settings.sharding == "fsdp":  # the recommended config must build in the user's FSDP2 script
            whole = sorted({a.spec.name for a in po.route(c.name, infos)
                            if not getattr(a.spec.optimizer_cls, "runs_on_dtensor", False)})
            if whole:
                c.status = "not runnable sharded"
                one = len(whole) == 1
                c.note = (f"precondtune's {', '.join(whole)} {'runs' if one else 'run'} on whole parameters and "
                          f"{'refuses' if one else 'refuse'} FSDP2's sharded ones; plan --sharding none (DDP) to "
                          "compare it")
    fitting = [c for c in candidates if c.fits and c.status not in ("not applicable", "not runnable sharded")]
    for c in candidates:
        if not c.fits and c.status not in ("not applicable", "not runnable sharded"):
            c.status = "does not fit"
            c.note = f"over the budget by {human_bytes(-int(c.memory.get('headroom_bytes', 0)))}"
    meta = prof.meta
    storage = None
    nothing = "nothing fits in the memory budget: lower --batch-size, use --param-dtype bf16, shard with " \
              "--world-size/--sharding, or plan for a larger --gpu"
    if meta:
        for c in fitting:
            c.status, c.note = "not searched", "meta-device model"
        reason = ("the model is on the meta device, so only memory and overhead were planned: searches need a model "
                  "that can run — build a smaller config of the same architecture (fewer layers, narrower width) on "
                  "a real device and plan that")
        return PlanResult(mf, settings, prof, memory, flops, candidates, None, None,
                          reason + ("" if fitting else "; " + nothing), meta, time.perf_counter() - t0)
    if not fitting:
        return PlanResult(mf, settings, prof, memory, flops, candidates, None, None, nothing, meta,
                          time.perf_counter() - t0, dtype_note=dtype_note)

    storage = storage_url(settings.storage)
    log("4/5 searches" + ("" if is_memory_url(storage) else
                          f" (studies in {storage}; optuna-dashboard opens it)"))
    ordered = sorted(fitting, key=lambda c: c.name != "adamw")  # AdamW first: its time is the budget
    for k, c in enumerate(ordered):
        study = _study_name(settings, mf, c.name, fixed[c.name], enqueue[c.name])
        missing = max(0, settings.trials - _finished_trials(storage, study))
        desc = f"search {k + 1}/{len(ordered)}: {c.name}"
        upto = f"up to {missing} new trial(s) in --timeout {settings.timeout:g} s" if settings.timeout is not None \
            else f"{missing} new trial(s)"
        log(f"{desc} — {upto}" + (" (resuming)" if missing < settings.trials else ""))
        s = SearchSettings(optimizer=c.name, trials=missing, steps=settings.steps, batch_size=settings.batch_size,
                           storage=storage, study_name=study, workers=settings.workers, timeout=settings.timeout,
                           seeds=1, adamw=settings.adamw, device=settings.device, seed=settings.seed,
                           fixed=fixed[c.name], enqueue=enqueue[c.name])

        def tick(done: int, total: int, best: float | None, pruned: int, failed: int, _d: str = desc) -> None:
            progress(_d, done, max(total, 1))

        try:
            c.search = run_search(mf, s, progress=tick)
        except PrecondtuneError as e:
            if c.name == "adamw":  # the baseline every other optimizer is ranked against
                raise
            c.status, c.note = "not searched", str(e)  # e.g. Sophia's estimator on a file without logits_fn
            log(f"{desc}: not searched — {e}")
            continue
        c.hyperparameters = c.search.best_hyperparameters
        if c.hyperparameters is None:
            c.status = "no completed trial"
            ran = sum(c.search.new.values()) + sum(c.search.counts.values()) - c.search.counts.get("waiting", 0)
            c.note = c.search.first_failure or ("every trial was pruned or failed" if ran else
                                                "no trial ran (--timeout ended the search before the first one)")

    device = str(resolve_device(settings.device))
    searched = [c for c in ordered if c.hyperparameters is not None]
    if searched:
        # the memory and overhead stages used each optimizer's defaults; the searches may have picked knobs that
        # change both (Adafactor's momentum, GaLore's rank, refresh periods): estimate the tuned configs again,
        # so the fit check, the timing's refresh period and the recommended config's estimates describe them
        log("re-estimating memory and overhead for the tuned configs")
        tuned = {c.name: po_config(c) for c in searched}
        again = plan_memory(mf, list(tuned), MemorySettings(**mem_kwargs), hyperparameters=tuned, progress=progress)
        new_mem = {e["name"]: e for e in again["optimizers"]}
        new_cost = {o["name"]: o for o in flops_report(
            mf, list(tuned), batch_size=settings.batch_size, device=settings.device, gpu=settings.gpu,
            seed=settings.seed, hyperparameters=tuned, progress=progress).as_json()["optimizers"]}
        memory["optimizers"] = [new_mem.get(e["name"], e) for e in memory["optimizers"]]
        flops["optimizers"] = [new_cost.get(o["name"], o) for o in flops["optimizers"]]
        for c in searched:
            c.memory, c.cost = new_mem[c.name], new_cost.get(c.name, c.cost)
            if not c.fits:
                c.status = "does not fit"
                c.note = (f"its tuned config is over the budget by "
                          f"{human_bytes(-int(c.memory.get('headroom_bytes', 0)))}")
        searched = [c for c in searched if c.fits]
    log("5/5 timing the best configs side by side, then ranking them"
        + (" at equal wall-clock" if settings.rank_by == "time" else " at equal steps"))
    timing_warning = measure_side_by_side(mf, settings, searched, device, progress)
    if settings.rank_by != "time":  # the ranking does not use the timings
        timing_warning = None
    if timing_warning:
        log("warning: " + timing_warning)
    adamw = next((c for c in searched if c.name == "adamw"), None)
    budget = adamw.step_seconds * settings.steps if adamw is not None and adamw.step_seconds else None
    for k, c in enumerate(searched):
        progress("ranking runs", k, len(searched))
        steps = settings.steps
        if settings.rank_by == "time" and budget and c.step_seconds and c is not adamw:
            steps = int(budget / c.step_seconds)
            if steps < 1:
                c.status = "too slow"
                c.note = (f"not one step ({c.step_seconds:.3g} s) fits into AdamW's {budget:.3g} s; "
                          "plan --rank-by steps compares it at equal steps")
                continue
            if steps < min(MIN_RANK_STEPS, settings.steps):
                c.note = (f"fits only {steps} of AdamW's {settings.steps} steps' time: ranked on {steps}, a short "
                          "run that says little; --rank-by steps compares at equal steps")
            steps = min(steps, 2 * settings.steps)
        c.rank_steps = steps
        runs = _rank_run(mf, settings, c, steps, device)
        c.rank_losses = [r.eval_loss if r.eval_loss is not None else math.inf for r in runs]
        c.curve = list(runs[0].losses)
        c.curve_seconds = [sum(runs[0].step_seconds[: i + 1]) for i in range(len(runs[0].step_seconds))]
        c.status = "ranked" if c.median is not None else "diverged in ranking"
        if c.median is None:
            c.note = next((r.stop_reason for r in runs if r.stop_reason), "diverged")
    progress("ranking runs", len(searched), len(searched))
    winner, reason = decide(candidates)
    return PlanResult(mf, settings, prof, memory, flops, candidates, storage, winner, reason, meta,
                      time.perf_counter() - t0, timing_warning=timing_warning, dtype_note=dtype_note)


def recommended_config(result: PlanResult) -> dict[str, Any]:
    """The SPEC.md recommended-config document for the winner (routing: the optimizer's default, made explicit)."""
    from .config import plain

    win = result.by_name[result.winner]  # type: ignore[index]
    spec = po.get_spec(win.name)
    # exactly the routing the searches and ranking runs used: the tuned AdamW's values, else AdamW's defaults
    groups = fallback_routing(spec, result.settings.adamw) or fallback_routing(
        spec, AdamWReference(**{k: v for k, v in po.config_dict(po.get_spec("adamw").default_config()).items()
                                if k in ("lr", "betas", "eps", "weight_decay")})) or []
    groups = [plain(g) for g in groups]
    adamw = result.by_name.get("adamw")
    return {
        "schema_version": 1,
        "optimizer": spec.name,
        "hyperparameters": plain(win.hyperparameters or {}),
        "param_groups": groups,
        "estimates": {
            "optimizer_state_bytes": int(win.memory["bytes"]["optimizer_state"]),
            "total_peak_bytes": int(win.memory["bytes"]["total_peak"]),
            # undefined (None) when FlopCounterMode counts no forward+backward FLOPs on the model
            "flop_overhead": float(overhead) if (overhead := (win.cost or {}).get("overhead")) is not None
            and math.isfinite(overhead) else None,
            "batch_size": result.settings.batch_size,
        },
        "evidence": {
            "storage": result.storage,
            "study": win.search.study if win.search else None,
            "trials": int(sum(win.search.counts.get(k, 0) for k in ("complete", "pruned", "failed")))
            if win.search else 0,
            "best_eval_loss": win.median,
            "adamw_eval_loss": adamw.median if adamw else None,
            "rank_by": result.settings.rank_by,
            "seeds": result.settings.seeds,
            "reason": result.reason,
        },
    }


def write_outputs(result: PlanResult, out: Path, fmt: str = "yaml") -> dict[str, Path]:
    """Write the config, report, plots and CSV into ``out`` (each file atomically)."""
    from . import report
    from .config import write as write_config
    from .config import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if result.winner is not None:
        files["config"] = write_config(recommended_config(result), out / f"recommended.{fmt}", fmt)
    frame = result.frame()
    tmp = out / ".results.csv.tmp"
    frame.to_csv(tmp, index=False)
    tmp.replace(out / "results.csv")
    files["csv"] = out / "results.csv"
    files.update(report.plots(result, out))
    files["report"] = write_text_atomic(out / "report.md", report.markdown(result, files))
    # a reused --out directory keeps nothing from an earlier run that this one did not write (a stale
    # recommended.yaml next to a "nothing fits" report would be loaded by scripts)
    for name in OUTPUT_NAMES:
        stale = out / name
        if stale.exists() and stale not in files.values():
            stale.unlink()
    return files
