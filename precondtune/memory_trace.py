"""Tracing one training step's memory without allocating it: ``FakeTensorMode`` + ``MemTracker``.

A *fake copy* of the model (every parameter and buffer a ``FakeTensor`` on the CPU fake device, tied weights kept
tied, nothing allocated) runs the user's loss, ``backward`` and an optimizer step under
``torch.distributed._tools.MemTracker``, which attributes every storage to parameters, gradients, activations,
temporaries and optimizer state. The same works for a meta-device model: only shapes and dtypes are read.

Two traces make up one step (the training loop is ``loss = f(batch); loss.backward(); opt.step();
opt.zero_grad(set_to_none=True)``):

* **forward/backward** (needs a batch, independent of the optimizer): peak bytes in each phase;
* **optimizer step** (needs no batch): two ``step()`` calls on fake gradients, since optimizer state is created
  lazily on the first call and the steady state is reached on the second; the peak over both is kept (the first
  step also runs the refreshes, e.g. SOAP's eigenbasis initialisation).

In the second iteration of a real loop the forward and backward run with the optimizer state alive, so a phase's
peak is ``traced fwd/bwd peak + optimizer state``; the step's peak is traced with weights, gradients and state.

**Repeated blocks.** Tracing is Python-speed (tens of microseconds per op), so for a model whose largest
``nn.ModuleList`` holds ``L ≥ 8`` structurally identical blocks, each trace is run with a few blocks and extended
on a line to ``L`` (identical blocks add identical bytes: saved activations in forward; activations or gradients,
whichever dominates, in backward; state and foreach temporaries in the step). The forward/backward trace uses 1, 2
and 3 blocks and requires the three peaks to lie exactly on a line, else (or if the truncated model fails to run)
the full model is traced. Optimizer-step traces use 1 and 2 blocks: a per-parameter loop's transient is constant
in ``L`` and a multi-tensor (foreach) one is linear, both exact; a routed optimizer whose parts peak in different
regimes could switch regime beyond 2 blocks, which a third point would not rule out either (docs/memory.md).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode

from .modelfile import iter_tensors, map_batch

MIN_BLOCKS_TO_EXTRAPOLATE = 8
"""Below this many repeated blocks the full model is traced (three truncated traces would cost about as much)."""

PHASES = ("forward", "backward", "step")
_aten = torch.ops.aten
_GRAD = _MemRefType.GRAD


class _NoHook:
    """A stand-in hook handle for a parameter that gets no hook."""

    def remove(self) -> None:
        return None


_NO_HOOK = _NoHook()


class PhaseMemTracker(MemTracker):
    """``MemTracker`` that also keeps the peak (and its per-category breakdown) of each named phase.

    ``grad_weight`` c picks *which* instant is a phase's peak: the one with the most ``total + c · gradient
    bytes``. With c = 0 it is the plain peak. A sharded run keeps only 1/N of the gradients (ZeRO-2, FSDP), and a
    run whose gradients are wider than its weights keeps more; its per-GPU peak in backward comes at another
    instant than the unsharded trace's (earlier: more activations alive, fewer gradients), so the caller passes
    c = (per-GPU gradient bytes per traced gradient byte) − 1 and gets that instant. ``peaks`` holds the plain
    total at the chosen instant, ``peak_snaps`` its breakdown.

    Module-wise snapshots are not kept: updating them costs O(modules) per op, which dominates on large models.
    """

    def __init__(self, grad_weight: float = 0.0) -> None:
        super().__init__()
        self.phase: str | None = None
        self.grad_weight = grad_weight
        self.peaks: dict[str, int] = {}
        self.peak_snaps: dict[str, dict[str, int]] = {}
        self._weighted: dict[str, float] = {}

    def _update_peak_stats(self, peak_state: Any) -> None:  # called by MemTracker after every op
        total = grads = 0
        for dev, snap in self._curr_mem_snap.items():
            total += snap["Total"]
            grads += snap.get(_GRAD, 0)
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)
        if self.phase is None:
            return
        weighted = total + self.grad_weight * grads
        if weighted > self._weighted.get(self.phase, -math.inf):
            self._weighted[self.phase] = weighted
            self.peaks[self.phase] = total
            self.peak_snaps[self.phase] = self.categories()

    def forget(self, phase: str) -> None:
        """Drop ``phase``'s peak (a second iteration measures it afresh)."""
        for d in (self.peaks, self.peak_snaps, self._weighted):
            d.pop(phase, None)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        # MemTracker hooks every parameter for its gradient, and register_hook refuses a frozen one (LoRA, a frozen
        # embedding). A frozen parameter never gets a gradient: mark it as already hooked so MemTracker skips it
        # (it still counts its bytes), with a handle whose remove() does nothing.
        for p in module.parameters():
            if not p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                self._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def current(self) -> int:
        return sum(s["Total"] for s in self._curr_mem_snap.values())

    def categories(self) -> dict[str, int]:
        """Current bytes per MemTracker category (``Parameter``, ``Gradient``, ``Activation``, ...)."""
        out: dict[str, int] = {}
        for snap in self._curr_mem_snap.values():
            for k, v in snap.items():
                key = getattr(k, "value", k)
                out[key] = out.get(key, 0) + v
        return out

    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        self.phase = name
        if name not in self.peaks:
            self._update_peak_stats(None)  # the phase's first instant is its peak until an op raises it
        try:
            yield
        finally:
            self.phase = None


class DataStub(TorchDispatchMode):
    """Answers what a fake tensor cannot: data-dependent scalar reads and data-dependent shapes.

    * Scalar reads (``.item()``, ``float(t)``, ``bool(t)``) get 1. Optimizers read scalars for clipping factors
      and finiteness checks; values only steer such branches, never shapes.
    * A boolean mask's selection (``logits[labels != -100]``, ``masked_select``, ``nonzero``, one-argument
      ``where``) gets its largest shape: every element selected, as in a batch without padding, so the traced
      memory is an upper bound. ``bounded`` records that this happened (the estimate says so).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bounded = False
        self.scalar_reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default:
            self.scalar_reads += 1
            t = args[0]
            if t.dtype == torch.bool:
                return True
            return 1.0 if t.is_floating_point() or t.is_complex() else 1
        if func is _aten.nonzero.default:
            self.bounded = True
            t = args[0]
            return torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)
        if func is _aten.masked_select.default:
            self.bounded = True
            x, mask = args
            n = torch.Size(torch.broadcast_shapes(x.shape, mask.shape)).numel()
            return torch.empty((n,), dtype=x.dtype, device=x.device)
        if func is _aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.bounded = True
            indices: list[Any] = []
            for i in args[1]:  # a k-dim mask stands for k index tensors of its number of elements
                if i is not None and i.dtype == torch.bool:
                    indices.extend(torch.empty((i.numel(),), dtype=torch.long, device=i.device) for _ in range(i.dim()))
                else:
                    indices.append(i)
            return func(args[0], indices)
        return func(*args, **kwargs)


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the largest ``nn.ModuleList`` (by parameters) of ≥ 2 identical children.

    Identical = same module types and the same parameter names, shapes and dtypes, in order.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        sigs = {_signature(b) for b in m}
        if len(sigs) != 1:
            continue
        size = sum(p.numel() for p in m.parameters())
        if best is None or size > best[0]:
            best = (size, name, m)
    return (best[1], best[2]) if best else None


def _signature(module: nn.Module) -> tuple:
    return (tuple(type(m).__name__ for m in module.modules()),
            tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()))


@dataclass
class FakeModel:
    """A fake copy of a model (maybe with its repeated blocks truncated) and the mode that owns its tensors."""

    model: nn.Module
    mode: FakeTensorMode
    blocks: int | None = None


def fake_copy(model: nn.Module, mode: FakeTensorMode, *, param_dtype: torch.dtype | None = None,
              keep_blocks: int | None = None, checkpoint_blocks: bool = False) -> FakeModel:
    """Deep-copy ``model`` with every parameter/buffer replaced by an empty fake tensor (tied weights stay tied).

    ``param_dtype`` casts floating parameters and buffers; ``keep_blocks`` keeps that many repeated blocks;
    ``checkpoint_blocks`` wraps each repeated block's forward in ``torch.utils.checkpoint`` (non-reentrant).
    """
    memo: dict[int, Any] = {}
    found = repeated_blocks(model)
    dropped: set[int] = set()
    if found is not None and keep_blocks is not None:
        for b in list(found[1])[keep_blocks:]:
            dropped.update(id(t) for t in [*b.parameters(), *b.buffers()])
    with mode:
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) in memo or id(t) in dropped:
                continue
            dtype = param_dtype if param_dtype is not None and t.is_floating_point() else t.dtype
            fake = torch.empty_strided(tuple(t.shape), _contiguous_strides(t.shape), dtype=dtype, device="cpu")
            memo[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else fake
    kept = None
    if found is not None and keep_blocks is not None:
        _, blocks = found
        kept = min(keep_blocks, len(blocks))
        memo[id(blocks)] = nn.ModuleList(copy.deepcopy(b, memo) for b in list(blocks)[:kept])
    fake_model = copy.deepcopy(model, memo)
    if checkpoint_blocks and found is not None:
        for block in fake_model.get_submodule(found[0]):
            _checkpoint_forward(block)
    return FakeModel(fake_model, mode, kept)


def _contiguous_strides(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _checkpoint_forward(block: nn.Module) -> None:
    forward = block.forward

    @functools.wraps(forward)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed  # type: ignore[method-assign]


def fake_batch(batch: Any, mode: FakeTensorMode) -> Any:
    """The batch with every tensor replaced by a fake one."""
    return map_batch(batch, mode.from_tensor)


def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """The batch with its floating tensors in ``dtype`` (what a model whose parameters are in ``dtype`` is fed
    when no autocast converts its inputs)."""
    return map_batch(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)


@dataclass
class Trace:
    """Peak bytes per phase of one trace, and the per-category breakdown at each phase's peak."""

    peaks: dict[str, int] = field(default_factory=dict)
    snaps: dict[str, dict[str, int]] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    """Bytes per category when the trace ended (e.g. the optimizer state after the step)."""
    bounded: bool = False
    """A boolean mask's selection was traced at its largest (:class:`DataStub`): the peaks are upper bounds."""
    scalar_reads: int = 0
    """Tensor values read (``.item()``, ``int(t)``, ``if t:``) and answered with 1 or True (:class:`DataStub`)."""
    no_grad: tuple[str, ...] = ()
    """Trainable parameters the backward left without a gradient (unused on this batch)."""


def _forward_backward(mt: PhaseMemTracker, model: nn.Module, batch: Any,
                      loss: Callable[[nn.Module, Any], torch.Tensor], autocast: torch.dtype | None) -> None:
    """One forward (under CPU autocast to ``autocast`` when given) and one backward, each in its own phase; the
    loss tensor is released on return."""
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with mt.in_phase("forward"), ctx:
        out = loss(model, batch)
    with mt.in_phase("backward"):
        out.backward()


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """Python's cycle collector off for the span of a trace: a collection that happened to run mid-trace freed
    cycle-held tensors at a moment that depended on everything the process had done before, so the same estimate
    came out 256 KiB apart between runs (Iso's hooks)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def trace_forward_backward(fm: FakeModel, batch: Any, loss: Callable[[nn.Module, Any], torch.Tensor], *,
                           autocast: torch.dtype | None = None, grad_weight: float = 0.0) -> Trace:
    """Peak bytes of one forward and one backward of the fake model (weights, buffers and the batch included);
    ``grad_weight`` as in :class:`PhaseMemTracker`."""
    stub = DataStub()
    with no_collection(), fm.mode, stub:
        fb = fake_batch(batch, fm.mode)
        mt = PhaseMemTracker(grad_weight)
        mt.track_external(fm.model, *iter_tensors(fb))
        with mt:
            _forward_backward(mt, fm.model, fb, loss, autocast)
        after = mt.categories()
        no_grad = tuple(n for n, p in fm.model.named_parameters() if p.requires_grad and p.grad is None)
    return Trace(dict(mt.peaks), dict(mt.peak_snaps), after, stub.bounded, stub.scalar_reads, no_grad)


def trace_step(fm: FakeModel, build: Callable[[nn.Module], torch.optim.Optimizer], *, extra: Any = None) -> Trace:
    """Peak bytes of two optimizer steps on fake gradients (state is created lazily in the first)."""
    stub = DataStub()
    with no_collection(), fm.mode, stub:
        for p in fm.model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros(p.shape, dtype=p.dtype, device="cpu")
        opt = build(fm.model)
        mt = PhaseMemTracker()
        mt.track_external(fm.model, *iter_tensors(extra))
        with mt:
            for _ in range(2):
                with mt.in_phase("step"):
                    opt.step()
        after = mt.categories()
    return Trace(dict(mt.peaks), dict(mt.peak_snaps), after, stub.bounded)


def trace_training(fm: FakeModel, batch: Any, loss: Callable[[nn.Module, Any], torch.Tensor],
                   build: Callable[[nn.Module], torch.optim.Optimizer], *, autocast: torch.dtype | None = None,
                   grad_weight: float = 0.0) -> Trace:
    """Two whole training iterations (forward, backward, step, ``zero_grad``); the MemTracker's stats are reset
    after the first, except the step's peak, kept over both (the first step creates the state and runs the
    refreshes). For optimizers that hook the model's forward/backward (e.g. Iso's covariance capture).
    ``grad_weight`` as in :class:`PhaseMemTracker` (the same as the forward/backward trace it is compared with)."""
    stub = DataStub()
    with no_collection(), fm.mode, stub:
        fb = fake_batch(batch, fm.mode)
        opt = build(fm.model)
        mt = PhaseMemTracker(grad_weight)
        mt.track_external(fm.model, opt, *iter_tensors(fb))
        after: dict[str, int] = {}
        with mt:
            for it in range(2):
                if it == 1:
                    mt.reset_mod_stats()
                    for phase in ("forward", "backward"):
                        mt.forget(phase)
                _forward_backward(mt, fm.model, fb, loss, autocast)
                with mt.in_phase("step"):
                    opt.step()
                after = mt.categories()
                opt.zero_grad(set_to_none=True)
    return Trace(dict(mt.peaks), dict(mt.peak_snaps), after, stub.bounded)


def extrapolate(run: Callable[[int | None], Trace], blocks: int | None, *, check: bool = True) -> tuple[Trace, str]:
    """``run(k)`` traced with k = 1, 2 (and 3 when ``check``) repeated blocks, extended to ``blocks`` on a line.

    With ``check`` the three peaks must lie exactly on a line, else the full model is traced. Returns the trace
    and how it was obtained (``"full"`` or ``"extrapolated from 1, 2[, 3] blocks"``).
    """
    if blocks is None or blocks < MIN_BLOCKS_TO_EXTRAPOLATE:
        return run(None), "full"
    ks = (1, 2, 3) if check else (1, 2)
    try:
        traces = [run(k) for k in ks]
    except Exception:  # noqa: BLE001 - the truncated model does not run (e.g. it indexes a fixed block count)
        return run(None), "full"
    t1, t2 = traces[0], traces[1]
    if any(set(t.peaks) != set(t1.peaks) for t in traces):
        return run(None), "full"
    out = Trace()
    for phase in t1.peaks:
        a, b = t1.peaks[phase], t2.peaks[phase]
        if check and traces[2].peaks[phase] - b != b - a:
            return run(None), "full"
        out.peaks[phase] = a + (blocks - 1) * (b - a)
    out.snaps = {ph: _line(t1.snaps[ph], t2.snaps[ph], blocks) for ph in t1.snaps}
    out.after = _line(t1.after, t2.after, blocks)
    out.bounded = any(t.bounded for t in traces)
    out.scalar_reads = max(t.scalar_reads for t in traces)
    out.no_grad = traces[0].no_grad  # names from the one-block model: examples, not a count
    return out, f"extrapolated from {', '.join(map(str, ks))} of {blocks} repeated blocks"


def _line(a: dict[str, int], b: dict[str, int], blocks: int) -> dict[str, int]:
    return {k: a.get(k, 0) + (blocks - 1) * (b.get(k, 0) - a.get(k, 0)) for k in {*a, *b}}


@contextlib.contextmanager
def quiet_fake_tensor_log() -> Iterator[None]:
    """FakeTensorMode logs a failing op's traceback before raising; the caller turns the error into one line."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
