"""One short, honest training run: the unit of a search trial (``tune``) and of ranking (``plan``).

Every run of one study starts from the same seeded weights and sees the same batch sequence
(:func:`prepare` draws both once); it trains the full short schedule — linear warmup then cosine or linear decay
over ``steps`` (``torch.optim.lr_scheduler.LambdaLR``, so every param group, routed AdamW groups included, is
scaled from its own lr) — and is scored by the mean loss over fixed evaluation batches at the end. A NaN/inf
loss, or one far above the starting loss, stops the run at once with a reason.

Optimizers that need the training loop are driven from it: Sophia's Hessian estimate every k steps (arXiv
2305.14342) through its documented hook :func:`precondtune.optim.sophia.hessian_step`, called after ``backward``
and before ``step`` with a generator seeded per run (the same sampled labels in every trial).
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import stopping
from .errors import ConfigError
from .modelfile import ModelFile, is_meta, iter_tensors, move_to
from .optim import build
from .profiling import synchronize
from .units import human_bytes

DIVERGE_FACTOR = 3.0
"""A loss above start + (factor−1)·|start| counts as divergence: a short run that triples its initial loss
(e.g. cross-entropy far above log(vocab)) has blown up, and no schedule this short recovers from it. Both sides
are robust to one outlier batch (the same in every trial): the start is the initial model's median loss over the
first :data:`DIVERGE_WINDOW` training batches, the current loss the lower median of the last (up to)
:data:`DIVERGE_WINDOW` step losses — a loss that stays up counts within two steps, a single spike never."""
DIVERGE_WINDOW = 5

DEFAULT_WARMUP_FRACTION = 0.1
"""Warmup is 10% of the steps unless given (common short-run practice, e.g. nanoGPT speedruns use 0–10%)."""

@dataclass(frozen=True)
class Schedule:
    """Linear warmup over ``warmup`` steps, then ``decay`` ("cosine" or "linear") to ``final`` × lr at ``steps``.

    factor(s) = (s+1)/W for s < W; else final + (1−final)·g(p), p = (s−W)/(S−W), g = ½(1+cos πp) or 1−p.
    """

    steps: int
    warmup: int | None = None
    decay: str = "cosine"
    final: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} is out of range; allowed: >= 1")
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay={self.decay!r}; allowed: cosine, linear, constant")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup={self.warmup} is out of range; allowed: 0 <= warmup <= steps ({self.steps})")

    @property
    def warmup_steps(self) -> int:
        if self.warmup is not None:
            return self.warmup
        return int(DEFAULT_WARMUP_FRACTION * self.steps)

    def factor(self, step: int) -> float:
        w = self.warmup_steps
        if step < w:
            return (step + 1) / w
        if self.decay == "constant":
            return 1.0
        p = (step - w) / max(self.steps - w, 1)
        g = 0.5 * (1 + math.cos(math.pi * p)) if self.decay == "cosine" else 1 - p
        return self.final + (1 - self.final) * g


@dataclass
class TrialData:
    """What every run of a study shares: the model file, seeded initial weights (on CPU), the batch sequence and
    the evaluation batches. Drawn once per (seed, steps, batch size) and reused, so trials differ only in the
    optimizer config."""

    mf: ModelFile
    template: nn.Module
    batches: list[Any]
    eval_batches: list[Any]
    device: torch.device
    seed: int
    start_loss: float | None = None
    """The initial model's median training loss over the first :data:`DIVERGE_WINDOW` batches (the divergence
    check's start), measured by the first :func:`train` on the data's device; NaN: not finite (the first step's loss
    is used)."""


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_batches_fit(mf: ModelFile, batch: Any, steps: int, batch_size: int) -> None:
    """The ``steps`` batches a trial replays are drawn up front: refuse a count that would fill the machine's memory
    (more than half of it) instead of letting the kernel kill the process. Counted as if each batch owned its
    tensors (a batch that views one shared dataset tensor costs less)."""
    each = sum(t.numel() * t.element_size() for t in iter_tensors(batch) if t.device.type == "cpu")
    ram = _physical_memory()
    if ram and each * steps > ram // 2:
        raise ConfigError(f"--steps {steps}: a trial replays {steps} batches drawn up front from {mf.path}'s "
                          f"sample_batch({batch_size}), {human_bytes(each)} each, {human_bytes(each * steps)} in all, "
                          f"more than half of this machine's {human_bytes(ram)}; lower --steps or --batch-size")


def prepare(mf: ModelFile, *, steps: int, batch_size: int, seed: int = 0,
            device: torch.device | str = "cpu") -> TrialData:
    """Build the model under ``seed`` and draw ``steps`` training batches under ``seed`` (same for every trial)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        template = mf.build()
        if is_meta(template):
            raise ConfigError(f"{mf.path}: the model is on the meta device (no weights), so it cannot be trained; "
                              "make build_model return a runnable model (e.g. a smaller config on CPU) to tune it "
                              "— memory and flops plan meta models as they are")
        first = mf.sample_batch(batch_size)
        _check_batches_fit(mf, first, steps, batch_size)
        batches = [first, *(mf.sample_batch(batch_size) for _ in range(steps - 1))]
    evals = mf.eval_batches(batch_size)
    device = torch.device(device)
    if device.type == "cpu":  # moved once here, so the training loop and evaluation need not move them again
        batches, evals = [move_to(b, device) for b in batches], [move_to(b, device) for b in evals]
    return TrialData(mf, template.cpu(), batches, evals, device, seed)


@dataclass
class TrainResult:
    """What one run measured. ``eval_loss`` is None when the run stopped early."""

    eval_loss: float | None
    losses: list[float]
    step_seconds: list[float]
    start_loss: float
    stop_reason: str | None = None
    diverged: bool = False
    seconds: float = 0.0
    """Wall time of the whole run: setup, steps and evaluation."""
    reports: dict[int, float] = field(default_factory=dict)

    @property
    def steps_run(self) -> int:
        return len(self.losses)

    @property
    def median_step_seconds(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None

    @property
    def train_seconds(self) -> float:
        return float(sum(self.step_seconds))


def find_hook(opt: torch.optim.Optimizer) -> Callable[..., Any] | None:
    """The training-loop hook ``hook(opt, model, batch, loss_fn, logits_fn, generator=)`` ``opt`` needs, if any
    (today: Sophia's :func:`~precondtune.optim.sophia.hessian_step` when ``opt`` has a Sophia part)."""
    try:
        from .optim import sophia
    except ImportError:  # an install without the Sophia module: nothing to drive
        return None
    return sophia.hessian_step if sophia.sophia_parts(opt) else None


def evaluate(mf: ModelFile, model: nn.Module, batches: list[Any], device: torch.device) -> float:
    """Mean loss over ``batches`` in eval mode without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            total = sum(float(mf.loss(model, move_to(b, device))) for b in batches)
    finally:
        model.train(was_training)
    return total / max(len(batches), 1)


def _non_finite(loss: torch.Tensor, model: nn.Module) -> str | None:
    """What is not finite after a backward: the loss, else a gradient (named), else None."""
    value = float(loss.detach())
    if not math.isfinite(value):
        return f"loss {value}"
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"non-finite gradient of {name}"
    return None


def train(data: TrialData, optimizer: str, hyperparameters: dict[str, Any], *, schedule: Schedule,
          routing: Any = None, report_every: int = 0,
          callback: Callable[[int, float], str | None] | None = None,
          diverge_factor: float = DIVERGE_FACTOR) -> TrainResult:
    """Train a fresh copy of the seeded model for ``schedule.steps`` steps and evaluate it.

    Every ``report_every`` steps before the last, ``callback(step, mean loss of the last report_every steps)`` is
    called; a string it returns stops the run with that reason (a pruner's verdict). Exceptions propagate.
    """
    t_start = time.perf_counter()
    mf, device = data.mf, data.device
    model = copy.deepcopy(data.template).to(device)
    model.train()
    if data.start_loss is None:  # once per study, on the initial weights, with the first steps' dropout masks
        torch.manual_seed(data.seed)
        with torch.no_grad():  # not inference_mode: a buffer the forward caches is trained with afterwards
            data.start_loss = statistics.median(float(mf.loss(model, move_to(b, device)))
                                                for b in data.batches[:DIVERGE_WINDOW])
    opt = build(optimizer, model, routing=routing, **hyperparameters)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor)
    hook = find_hook(opt)
    torch.manual_seed(data.seed)  # dropout: the same masks in every trial
    generator = torch.Generator(device=device).manual_seed(data.seed) if hook is not None else None
    losses: list[float] = []
    times: list[float] = []
    result = TrainResult(None, losses, times, float("nan"))
    limit = float("inf")
    window = 0.0
    for step in range(schedule.steps):
        stopping.check()  # a Ctrl-C/SIGTERM during a search stops here, between steps
        batch = data.batches[step % len(data.batches)]
        if device.type != "cpu":
            batch = move_to(batch, device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = mf.loss(model, batch)
        loss.backward()
        try:
            if hook is not None:
                hook(opt, model, batch, mf.raw_loss, mf.logits_fn, generator=generator)
            opt.step()
        except RuntimeError as e:  # an eigh/SVD/QR of a NaN statistic raises (SOAP, GaLore, Iso): that is divergence
            if (why := _non_finite(loss, model)) is None:
                raise
            losses.append(float(loss.detach()))
            times.append(time.perf_counter() - t0)
            result.stop_reason = f"diverged: {why} at step {step} (the optimizer step raised {type(e).__name__})"
            result.diverged = True
            break
        sched.step()
        value = float(loss.detach())  # synchronizes the device
        synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(value)
        if step == 0:
            result.start_loss = value
            start = data.start_loss if math.isfinite(data.start_loss) else value
            limit = start + (diverge_factor - 1) * max(abs(start), 1e-12)
        if not math.isfinite(value):
            result.stop_reason, result.diverged = f"diverged: loss {value} at step {step}", True
            break
        if (recent := statistics.median_low(losses[-DIVERGE_WINDOW:])) > limit:
            result.stop_reason = (f"diverged: loss {recent:.4g} at step {step} (lower median of the last "
                                  f"{min(len(losses), DIVERGE_WINDOW)} steps) is above {diverge_factor:g}x the "
                                  f"starting loss {start:.4g}")
            result.diverged = True
            break
        window += value
        if report_every and (step + 1) % report_every == 0:
            mean = window / report_every
            window = 0.0
            result.reports[step + 1] = mean
            if callback is not None and step + 1 < schedule.steps:  # a verdict at the last step saves no step
                verdict = callback(step + 1, mean)
                if verdict:
                    result.stop_reason = verdict
                    break
    if result.stop_reason is None:
        stopping.check()
        result.eval_loss = evaluate(mf, model, data.eval_batches, device)
        if not math.isfinite(result.eval_loss):
            result.stop_reason, result.diverged = f"diverged: final eval loss {result.eval_loss}", True
            result.eval_loss = None
    result.seconds = time.perf_counter() - t_start
    return result
