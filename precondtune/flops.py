"""Compute overhead per optimizer: analytic step FLOPs against forward+backward, predicted and measured time.

For one model and batch, per optimizer (every parameter routed as :func:`precondtune.optim.build` routes it):

* ``train_flops_per_step`` F — one forward+backward, counted by ``FlopCounterMode`` with SDPA on its math
  backend (see :mod:`precondtune.profiling`); ``--tokens-per-batch B`` rescales the counted batch linearly
  (more sequences of the same length, so attention's per-token cost is unchanged).
* ``step_flops`` S — the matmul FLOPs of an ordinary optimizer step (what ``FlopCounterMode`` counts),
  ``refresh_step_flops`` the FLOPs of a step on which the preconditioner refreshes (eigh/QR/SVD at their
  documented operation counts, plus the extra matmuls), and
  ``amortized_step_flops`` A = S + refresh/every (per parameter, so different periods add correctly)
  + extra forward+backward passes an optimizer spends (Sophia's Hessian estimate every k steps) · F.
* Model-level costs an optimizer module declares next to its update: ``estimate_passes(configs)`` (Sophia's
  Hessian estimate, extra forward+backward passes every k steps, counted on the model with
  ``FlopCounterMode`` where it can run them, :func:`count_extra_passes`; amortized into A and added whole to
  the refresh step) and ``capture_flops(shape, tokens)`` (Iso's covariance hooks inside backward; every step).
* ``overhead`` = A / F. For Muon on a d_out×d_in matrix (m = min, n = max) with T Newton–Schulz steps,
  S = T·(4·m²·n + 2·m³) against the layer's 6·B·m·n, i.e. T·m/B for a square matrix (Jordan et al. 2024,
  github.com/KellerJordan/Muon; the seeds' "T·m/B").

Time: ``measure_step_times`` runs warm-up + N real steps (model, ``sample_batch``, loss, backward, the
module's ``hessian_step`` loop hook if it has one, step) and
times every step, so the refresh step is reported on its own instead of being averaged away. ``predict``
turns FLOPs and bytes into seconds on a GPU profile: matmuls FLOP-bound at ``mfu`` × peak, the elementwise
part of the step bandwidth-bound at ``mbu`` × peak memory bandwidth, with bytes moved from
:func:`bytes_moved` (the one place those byte counts live).
"""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from . import optim as po
from .dtypes import dtype_name, itemsize, parse_dtype
from .errors import ConfigError, PrecondtuneError
from .hardware import GPUProfile, resolve_profile
from .inventory import ParamInfo, count_parameters, inventory
from .modelfile import ModelFile, move_to, tokens_in
from .profiling import FLOP_METHOD, count_train_flops, resolve_device, synchronize
from .training import find_hook

DEFAULT_MFU = 0.4
"""Assumed model-FLOP utilisation of matmuls: well-tuned large runs report 38–46% of dense peak (PaLM 46.2%,
arXiv 2204.02311 Table 3; Llama 3 405B 38–43% BF16 MFU on H100, arXiv 2407.21783 Table 4); 0.4 sits in that band.
Small models and optimizer-sized matmuls usually do worse, so the prediction is a lower bound on time."""
DEFAULT_MBU = 0.8
"""Assumed fraction of datasheet memory bandwidth an elementwise (fused, streaming) kernel reaches; copy/triad
kernels on HBM GPUs typically sustain 80–90% of the datasheet figure."""
DEFAULT_MATMUL_DTYPE = "bf16"
"""Mixed-precision training runs its matmuls in bf16, so the bf16 tensor-core peak is the default."""
MAX_REFRESH_WINDOW = 256
"""``measure_step_times`` times at least one full refresh period only when the period is at most this many
steps; longer periods get the median step time without a separate refresh time."""

EXTRA_PASSES: Mapping[str, int] = {
    # Element passes (parameter-sized reads+writes) of temporaries per step, beyond the minimum every
    # optimizer moves: read p and g, write p, read+write every state byte. Counted from each update rule
    # assuming fused elementwise kernels; rounded estimates, documented in docs/flops.md.
    "adamw": 0,        # one fused kernel: m, v, p updated in registers
    "adafactor": 3,    # g read again for the row/col means of g²; the unscaled update written, read for RMS clip
    "adam-mini": 1,    # g read again for the per-block mean of g²
    "shampoo": 4,      # preconditioned gradient written+read; the grafting (Adam) direction written+read
    "soap": 4,         # rotated gradient written+read; the update rotated back written+read
    "muon": 2,         # the orthogonalised update written by Newton–Schulz, read by the parameter update
    "sophia": 2,       # the clipped ratio m/max(γ·h, ε) written, read by the parameter update
    "iso": 2,          # the preconditioned update written+read
    "iso-adam": 4,     # preconditioned gradient written+read; the Adam direction written+read
    "adadiag": 4,      # rotated gradient written+read; the update rotated back written+read
    "adadiag-pp": 4,
    "adafac-diag": 4,
    "hfac": 4,
    "hfac-diag": 4,
    "galore": 2,       # the projected-back low-rank update written+read (the projected gradient is small)
}
DEFAULT_EXTRA_PASSES = 2
"""For an optimizer missing from :data:`EXTRA_PASSES`: one update temporary written and read."""

@dataclass(frozen=True)
class Measured:
    """Measured wall-clock seconds of whole training steps (zero_grad, forward, backward, optimizer step)."""

    step_seconds: float
    """Median over the timed steps."""
    ordinary_step_seconds: float
    """Median over the timed steps that are not refresh steps."""
    refresh_step_seconds: float | None
    """Mean time of the steps in the refresh phase (the period's slowest phase); None without a refresh."""
    refresh_step: int | None
    """The optimizer step number (1-based) of the first refresh step timed."""
    amortized_step_seconds: float
    """ordinary + (refresh − ordinary)/every: the long-run average seconds per step."""
    times: tuple[float, ...] = field(repr=False, default=())


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds per training step on a GPU profile."""

    step_seconds: float
    """Amortized: forward+backward + optimizer matmuls (refreshes spread) + elementwise traffic."""
    refresh_step_seconds: float | None
    optimizer_seconds: float
    """The optimizer's share of ``step_seconds`` (amortized)."""


@dataclass(frozen=True)
class OptimizerCost:
    """The compute cost of one optimizer on one model (see module docstring for each quantity)."""

    name: str
    hyperparameters: dict[str, Any]
    step_flops: int
    refresh_step_flops: int
    refresh_every: int
    amortized_step_flops: float
    overhead: float
    extra_train_passes: float
    bytes_moved: int
    bytes_per_parameter: float
    predicted: Prediction | None = None
    predicted_time_overhead: float | None = None
    measured: Measured | None = None
    measured_time_overhead: float | None = None
    measure_note: str | None = None

    def as_json(self) -> dict[str, Any]:
        p, m = self.predicted, self.measured
        return {
            "name": self.name, "hyperparameters": self.hyperparameters,
            "step_flops": self.step_flops, "refresh_step_flops": self.refresh_step_flops,
            "refresh_every": self.refresh_every, "amortized_step_flops": self.amortized_step_flops,
            "overhead": self.overhead, "extra_train_passes": self.extra_train_passes,
            "bytes_moved_per_step": self.bytes_moved, "bytes_per_parameter": self.bytes_per_parameter,
            "predicted_step_seconds": p.step_seconds if p else None,
            "predicted_refresh_step_seconds": p.refresh_step_seconds if p else None,
            "predicted_optimizer_seconds": p.optimizer_seconds if p else None,
            "predicted_time_overhead": self.predicted_time_overhead,
            "measured_step_seconds": m.step_seconds if m else None,
            "measured_refresh_step_seconds": m.refresh_step_seconds if m else None,
            "measured_refresh_step": m.refresh_step if m else None,
            "measured_amortized_step_seconds": m.amortized_step_seconds if m else None,
            "measured_time_overhead": self.measured_time_overhead, "measure_note": self.measure_note,
        }


@dataclass(frozen=True)
class FlopsReport:
    """What ``precondtune flops`` reports: the model, the batch, F, and one :class:`OptimizerCost` each."""

    path: str
    parameters: int
    trainable_parameters: int
    batch_size: int
    counted_tokens: int
    tokens_per_batch: int
    train_flops_per_step: int
    optimizers: list[OptimizerCost]
    device: str | None = None
    gpu: GPUProfile | None = None
    mfu: float = DEFAULT_MFU
    mbu: float = DEFAULT_MBU
    matmul_dtype: str = DEFAULT_MATMUL_DTYPE
    predicted_train_seconds: float | None = None

    def as_json(self) -> dict[str, Any]:
        gpu = None
        if self.gpu is not None:
            gpu = {"profile": self.gpu.name, "peak_flops": self.gpu.peak_flops(self.matmul_dtype),
                   "memory_bandwidth": self.gpu.memory_bandwidth.value, "matmul_dtype": self.matmul_dtype,
                   "mfu": self.mfu, "mbu": self.mbu, "predicted_train_seconds": self.predicted_train_seconds}
        return {
            "model": {"path": self.path, "parameters": self.parameters,
                      "trainable_parameters": self.trainable_parameters},
            "batch_size": self.batch_size, "counted_tokens": self.counted_tokens,
            "tokens_per_batch": self.tokens_per_batch, "train_flops_per_step": self.train_flops_per_step,
            "flops_method": FLOP_METHOD, "device": self.device, "gpu": gpu,
            "optimizers": [o.as_json() for o in self.optimizers],
        }


# --------------------------------------------------------------------------------------------- analytic


def _module_of(spec: po.OptimizerSpec) -> Any:
    return sys.modules.get(spec.optimizer_cls.__module__)


def extra_train_passes(configs: Mapping[str, list[Any]]) -> tuple[float, float]:
    """Extra forward+backward passes, in units of one training forward+backward: (per step, amortized; on a
    step that runs them), for the param-group configs of each optimizer spec a model is routed to.

    Sophia re-estimates its diagonal Hessian every k steps with one more forward+backward (Gauss–Newton–Bartlett)
    or about three (Hutchinson) (Liu et al., arXiv 2305.14342, Algorithms 1–3), in whichever part of a routed
    optimizer it runs. An optimizer module declares such a model-level cost with
    ``estimate_passes(configs) -> (amortized, per estimate)``; :func:`count_extra_passes` counts it on a model.
    """
    amortized = peak = 0.0
    for name, group_configs in configs.items():
        hook = getattr(_module_of(po.get_spec(name)), "estimate_passes", None)
        if hook is not None:
            a, p = hook(group_configs)
            amortized, peak = amortized + a, peak + p
    return amortized, peak


def count_extra_passes(mf: ModelFile, model: torch.nn.Module, batch: Any, name: str, train_flops: int, *,
                       routing: Any = None, hyperparameters: Mapping[str, Any] | None = None
                       ) -> tuple[float, float] | None:
    """:func:`extra_train_passes` counted by ``FlopCounterMode`` on ``model`` and ``batch`` instead of assumed:
    each set of Sophia param groups that re-estimate together is run once (only their parameters are
    differentiated, so a Sophia part holding a few tensors costs less than a whole forward+backward), weighted
    by the share of steps it runs on. ``train_flops`` is F counted on the same batch. None when the model cannot
    run the estimate (no ``logits_fn`` for GNB, no double backward for Hutchinson, an op the meta device lacks):
    the assumed passes then stand."""
    from .optim import sophia

    opt = po.build(name, model, routing=routing, **dict(hyperparameters or {}))
    parts = sophia.sophia_parts(opt)
    if not parts or not train_flops:
        return None
    param = next(model.parameters())
    batch = move_to(batch, param.device)
    amortized = peak = 0.0
    try:
        for part in parts:
            shares = sophia.estimate_shares([part.group_config(g).k for g in part.param_groups])
            most = 0
            for groups, share in shares.items():
                counter = FlopCounterMode(display=False)
                generator = torch.Generator(param.device).manual_seed(0) if param.device.type != "meta" else None
                with sdpa_kernel([SDPBackend.MATH]), counter:
                    part.update_hessian(model, batch, mf.raw_loss, mf.logits_fn, groups=sorted(groups),
                                        generator=generator)
                flops = counter.get_total_flops()
                amortized += float(share) * flops
                most = max(most, flops)
            peak += most
    except (PrecondtuneError, RuntimeError, NotImplementedError):
        return None
    finally:
        model.zero_grad(set_to_none=True)
    return amortized / train_flops, peak / train_flops


def capture_flops(spec: po.OptimizerSpec, info: ParamInfo, tokens: int) -> int:
    """FLOPs an optimizer's module hooks spend inside forward/backward per step for one parameter.

    Iso captures XᵀX and GᵀG of every preconditioned ``nn.Linear`` during backward, 2·N·(in² + out²) for N rows
    (arXiv 2307.12979); a module declares such a cost with ``capture_flops(shape, tokens) -> int``.
    """
    hook = getattr(_module_of(spec), "capture_flops", None)
    return int(hook(info.shape, tokens)) if hook is not None and tokens else 0


def bytes_moved(spec: po.OptimizerSpec, info: ParamInfo, config: Any, state_dtype: torch.dtype | None = None) -> int:
    """Bytes one step moves through memory for one parameter's elementwise work.

    ``(3 + EXTRA_PASSES[name])·n·itemsize(param) + 2·state_bytes``: read p and g, write p, read and write every
    state byte once, plus the optimizer's parameter-sized temporaries (:data:`EXTRA_PASSES`). Matmul operands
    are left to the FLOP-bound part.
    """
    size = itemsize(info.dtype)
    passes = 3 + EXTRA_PASSES.get(spec.name, DEFAULT_EXTRA_PASSES)
    state = spec.state_bytes(info.shape, state_dtype or info.dtype, config, info)
    return passes * info.numel * size + 2 * state


@dataclass(frozen=True)
class Analytic:
    """Analytic per-step FLOPs and bytes of one optimizer on a list of parameters (summed per parameter)."""

    step_flops: int
    refresh_flops: int
    refresh_matmul: int
    """The part of ``refresh_flops`` that is matmuls (what FlopCounterMode counts on a refresh step)."""
    refresh_every: int
    amortized_flops: float
    """Σ per parameter of matmul + refresh/every (the optimizer's own FLOPs; extra passes not included)."""
    bytes_moved: int
    extra_passes: float
    """Amortized extra forward+backward passes per step (:func:`extra_train_passes`)."""
    config: Any
    estimate_passes: float = 0.0
    """The extra forward+backward passes on a step that runs them (added whole to the refresh step)."""

    def total_amortized(self, train_flops: float) -> float:
        """Amortized optimizer FLOPs per step including the extra forward+backward passes."""
        return self.amortized_flops + self.extra_passes * train_flops

    def refresh_step(self, train_flops: float) -> float:
        """FLOPs of the optimizer's part of a refresh step (an estimate's whole extra passes included)."""
        return self.step_flops + self.refresh_flops + self.estimate_passes * train_flops


def analyze(name: str, infos: list[ParamInfo], *, tokens: int = 0, routing: Any = None,
            hyperparameters: Mapping[str, Any] | None = None, rows: Mapping[str, int] | None = None) -> Analytic:
    """Per-parameter :class:`~precondtune.optim.StepFlops` and bytes under ``name``'s routing, summed.

    ``step_flops`` includes what hooks spend in forward/backward (:func:`capture_flops`) for the rows each layer
    saw (``rows``, by weight name, as :func:`precondtune.profiling.count_train_flops` records them), else for
    ``tokens`` rows.

    Refreshes are amortized per parameter (``refresh / every``), so parameters with different periods add
    correctly. The extra forward+backward passes are returned separately (they scale with F, not the params).
    """
    hp = dict(hyperparameters or {})
    main = po.get_spec(name)
    step = refresh = refresh_matmul = 0
    amortized = 0.0
    moved = 0
    periods: list[int] = []
    group_configs: dict[str, list[Any]] = {}  # each spec's distinct configs: its param groups, as build makes them
    for a in po.route(main.name, infos, routing, **hp):
        sf = a.spec.flops(a.info, a.config)
        capture = capture_flops(a.spec, a.info, tokens if rows is None else rows.get(a.info.name, 0))
        step += sf.matmul + capture
        refresh += sf.refresh
        refresh_matmul += sf.refresh_matmul
        amortized += sf.amortized + capture
        if sf.every:
            periods.append(sf.every)
        moved += bytes_moved(a.spec, a.info, a.config)
        configs = group_configs.setdefault(a.spec.name, [])
        if a.config not in configs:
            configs.append(a.config)
    extra, per_estimate = extra_train_passes(group_configs)
    return Analytic(step, refresh, refresh_matmul, min(periods) if periods else 0, amortized, moved,
                    extra, main.config(**hp), per_estimate)


def with_counted_passes(a: Analytic, mf: ModelFile, model: torch.nn.Module, batch: Any, name: str, train_flops: int,
                        *, routing: Any = None, hyperparameters: Mapping[str, Any] | None = None) -> Analytic:
    """``a`` with its extra passes counted on the model (:func:`count_extra_passes`) where it has any."""
    if not a.extra_passes:
        return a
    counted = count_extra_passes(mf, model, batch, name, train_flops, routing=routing,
                                 hyperparameters=hyperparameters)
    return a if counted is None else replace(a, extra_passes=counted[0], estimate_passes=counted[1])


# --------------------------------------------------------------------------------------------- prediction


def predict(a: Analytic, train_flops: float, gpu: GPUProfile, *, mfu: float = DEFAULT_MFU, mbu: float = DEFAULT_MBU,
            matmul_dtype: str = DEFAULT_MATMUL_DTYPE) -> Prediction:
    """Seconds per step: FLOPs / (mfu·peak) + bytes / (mbu·bandwidth).

    FLOP-bound: forward+backward, extra passes (amortized), the optimizer's matmuls and its decompositions
    (eigh/QR/SVD at their operation counts — optimistic, these run well below matmul efficiency on GPUs).
    Bandwidth-bound: :func:`bytes_moved`.
    """
    flop_rate = mfu * gpu.peak_flops(matmul_dtype)
    byte_rate = mbu * gpu.memory_bandwidth.value
    elementwise = a.bytes_moved / byte_rate
    optimizer = a.total_amortized(train_flops) / flop_rate + elementwise
    refresh = None
    if a.refresh_every:
        refresh = (train_flops + a.refresh_step(train_flops)) / flop_rate + elementwise
    return Prediction(train_flops / flop_rate + optimizer, refresh, optimizer)


# --------------------------------------------------------------------------------------------- measurement


def refresh_phase(times: list[float], every: int, offset: int = 0) -> tuple[int, float, float] | None:
    """The slowest phase of a periodic schedule: ``(first step number, its mean seconds, median of the rest)``.

    ``times[i]`` is the time of optimizer step ``offset + i + 1``. A refresh happens once every ``every`` steps,
    so the phase (step index mod ``every``) with the largest mean time is the refresh phase; this works whatever
    step an implementation refreshes on. Needs at least one full period.
    """
    if every <= 1 or len(times) < every:
        return None
    means = [statistics.fmean(times[p::every]) for p in range(every)]
    phase = max(range(every), key=means.__getitem__)
    rest = [t for i, t in enumerate(times) if i % every != phase]
    return offset + phase + 1, means[phase], statistics.median(rest)


def measure_step_times(mf: ModelFile, name: str, *, batch: Any, device: torch.device, steps: int = 10,
                       warmup: int = 3, every: int = 0, seed: int = 0, routing: Any = None,
                       hyperparameters: Mapping[str, Any] | None = None,
                       on_step: Callable[[int, int], None] | None = None) -> Measured:
    """Time ``warmup`` + N whole training steps of ``name`` (each step timed on its own, device synchronized).

    A step is zero_grad, forward, backward, the training-loop hook the optimizer needs, if any
    (:func:`precondtune.training.find_hook`: Sophia's Hessian estimate, also when Sophia is a routed part), step.

    N = ``steps``, raised to cover two refresh periods (one when ``every`` > 32) so the refresh step's own time
    is measured; periods over :data:`MAX_REFRESH_WINDOW` are not covered. Timed in the optimizer's steady state
    (``OptimizerSpec.steady_state``: Shampoo preconditions from the first step).
    """
    torch.manual_seed(seed)
    model = mf.build().to(device)
    hp, routing = po.with_spec_overrides(name, dict(hyperparameters or {}), routing, "steady_state")
    opt = po.build(name, model, routing=routing, **hp)
    batch = move_to(batch, device)
    n = steps
    if 1 < every <= MAX_REFRESH_WINDOW:
        n = max(steps, 2 * every if every <= 32 else every)
    total = warmup + n

    hook = find_hook(opt)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        mf.raw_loss(model, batch).backward()
        if hook is not None:
            hook(opt, model, batch, mf.raw_loss, mf.logits_fn)
        opt.step()

    times: list[float] = []
    for k in range(total):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
        if on_step:
            on_step(k + 1, total)
    median = statistics.median(times)
    found = refresh_phase(times, every, warmup) if every <= MAX_REFRESH_WINDOW else None
    if found is None:
        return Measured(median, median, None, None, median, tuple(times))
    first, refresh, ordinary = found
    return Measured(median, ordinary, refresh, first, ordinary + (refresh - ordinary) / every, tuple(times))


# --------------------------------------------------------------------------------------------- the report


def _check_unit(flag: str, value: float) -> None:
    if not 0 < value <= 1:
        example = DEFAULT_MFU if flag == "--mfu" else DEFAULT_MBU
        raise ConfigError(f"{flag} {value} is out of range; give a fraction in (0, 1], e.g. {flag} {example:g}")


def flops_report(mf: ModelFile, optimizers: str | list[str] = "all", *, batch_size: int = 8,
                 tokens_per_batch: int | None = None, measure: bool = False, steps: int = 10, warmup: int = 3,
                 device: str = "auto", gpu: str | None = None, mfu: float = DEFAULT_MFU, mbu: float = DEFAULT_MBU,
                 matmul_dtype: str = DEFAULT_MATMUL_DTYPE, seed: int = 0,
                 hyperparameters: Mapping[str, Mapping[str, Any]] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> FlopsReport:
    """Count F, cost every optimizer analytically, optionally predict (``gpu``) and measure (``measure``) time.

    Optimizers are sorted by ``overhead``. Time overheads are relative to AdamW's step on the same model
    (AdamW is measured as the baseline even when not asked for).
    """
    names = po.resolve_names(optimizers)
    _check_unit("--mfu", mfu)
    _check_unit("--mbu", mbu)
    profile = resolve_profile(gpu) if gpu else None
    try:
        matmul_dtype = dtype_name(parse_dtype(matmul_dtype))
    except ConfigError:
        raise ConfigError(f"--matmul-dtype {matmul_dtype}: unknown dtype; valid: bf16, fp16, fp32") from None
    if profile is not None and matmul_dtype not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"--matmul-dtype {matmul_dtype}: GPU profiles give peaks for bf16/fp16 and fp32 matmuls; "
                          "use one of those")
    if tokens_per_batch is not None and tokens_per_batch < 1:
        raise ConfigError(f"--tokens-per-batch {tokens_per_batch}: give a positive number of tokens")
    hps = {po.get_spec(k).name: dict(v) for k, v in (hyperparameters or {}).items()}

    torch.manual_seed(seed)
    model = mf.build()
    dev = resolve_device(device, model)
    if measure and dev.type == "meta":
        raise ConfigError(f"{mf.path}: the model is on the meta device and cannot run steps; drop --measure "
                          "(use --gpu PROFILE for a predicted time)")
    if dev.type == "cuda":
        model.to(dev)
    total, trainable = count_parameters(model)
    infos = inventory(model)
    batch = mf.sample_batch(batch_size)
    counted_tokens = tokens_in(batch)
    if dev.type != "meta":
        mf.check_first_step(model, move_to(batch, dev))
        model.zero_grad(set_to_none=True)
    linear_rows: dict[str, int] = {}
    counted = count_train_flops(mf, model, batch, linear_rows)
    tokens = tokens_per_batch or counted_tokens
    train_flops = round(counted * tokens / counted_tokens)
    rows = {k: round(v * tokens / counted_tokens) for k, v in linear_rows.items()}  # rescaled like F

    analytic = {n: with_counted_passes(analyze(n, infos, tokens=tokens, hyperparameters=hps.get(n), rows=rows),
                                       mf, model, batch, n, counted, hyperparameters=hps.get(n))
                for n in dict.fromkeys(["adamw", *names])}
    predicted = {n: predict(a, train_flops, profile, mfu=mfu, mbu=mbu, matmul_dtype=matmul_dtype)
                 for n, a in analytic.items()} if profile else {}
    measured: dict[str, Measured] = {}
    notes: dict[str, str] = {}
    if measure:
        del model
        todo = list(analytic)
        for k, n in enumerate(todo):
            def tick(done: int, of: int, n: str = n, k: int = k) -> None:
                if progress:
                    progress(f"timing {n} ({k + 1}/{len(todo)})", done, of)
            try:
                measured[n] = measure_step_times(mf, n, batch=batch, device=dev, steps=steps, warmup=warmup,
                                                 every=analytic[n].refresh_every,
                                                 seed=seed, hyperparameters=hps.get(n), on_step=tick)
            except PrecondtuneError as e:  # e.g. Sophia's GNB estimate on a model file without logits_fn
                notes[n] = f"not measured: {e}"

    params = sum(i.numel for i in infos)
    costs = []
    for n in names:
        a = analytic[n]
        amortized = a.total_amortized(train_flops)
        p = predicted.get(n)
        m = measured.get(n)
        base = measured.get("adamw")
        costs.append(OptimizerCost(
            name=n, hyperparameters=po.config_dict(a.config) if n in hps else {},
            step_flops=a.step_flops, refresh_step_flops=round(a.refresh_step(train_flops)),
            refresh_every=a.refresh_every, amortized_step_flops=amortized,
            overhead=amortized / train_flops if train_flops else float("inf"),
            extra_train_passes=a.extra_passes,
            bytes_moved=a.bytes_moved, bytes_per_parameter=a.bytes_moved / max(params, 1),
            predicted=p,
            predicted_time_overhead=p.step_seconds / predicted["adamw"].step_seconds - 1 if p else None,
            measured=m,
            measured_time_overhead=m.amortized_step_seconds / base.amortized_step_seconds - 1 if m and base else None,
            measure_note=notes.get(n),
        ))
    costs.sort(key=lambda c: (c.overhead, c.name))
    return FlopsReport(
        path=str(mf.path), parameters=total, trainable_parameters=trainable, batch_size=batch_size,
        counted_tokens=counted_tokens, tokens_per_batch=tokens, train_flops_per_step=train_flops,
        optimizers=costs, device=str(dev) if measure else None, gpu=profile, mfu=mfu, mbu=mbu,
        matmul_dtype=matmul_dtype,
        predicted_train_seconds=train_flops / (mfu * profile.peak_flops(matmul_dtype)) if profile else None,
    )
