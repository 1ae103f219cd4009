"""Will it fit? Per-GPU memory of one training step for each optimizer, traced rather than guessed.

``estimate_memory(model, "muon", batch_size=8)`` returns weights, gradients, optimizer state, activations, the
optimizer step's own temporaries and the peak, with the phase where the peak happens:

* **optimizer state** from each optimizer's exact ``state_bytes`` formula, summed over the role routing (Muon's
  AdamW fallback counted as AdamW); ``state_dtype`` defaults to the dtype the optimizer updates;
* **activations and temporaries** by tracing one step on a fake copy of the model (:mod:`.memory_trace`):
  peak = max over phases (forward, backward, step), each phase with what is alive during it — not the sum of
  the components, which over-counts;
* **sharding** over ``world_size`` GPUs: ZeRO-1 shards optimizer state, ZeRO-2 also gradients, FSDP also weights
  (plus the all-gathered units: the root's parameters and two blocks, current and prefetched). Non-elementwise
  optimizers (all but AdamW and Sophia: Muon, Shampoo, SOAP, Adafactor, AdaDiag, Iso, GaLore, ...) update whole
  matrices, so under any sharding the largest matrix they own is gathered for its update; that transient is
  counted in ``step_temporaries`` and said in ``notes``. An all-elementwise step runs over each GPU's shard, so
  its temporaries are divided by N; the backward peak is taken where the per-GPU bytes peak (gradients at their
  sharded share, :meth:`MemoryPlanner.forward_backward`);
* **fit** against a GPU profile's memory less a reserve for the CUDA context, library workspaces and allocator
  fragmentation (``reserve_gb``, default :data:`DEFAULT_RESERVE_GB`).

References: ZeRO (Rajbhandari et al., arXiv 1910.02054); FSDP (Zhao et al., arXiv 2304.11277).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses import FakeTensorMode

from . import optim as po
from .dtypes import dtype_name, itemsize, parse_dtype
from .errors import ConfigError, ModelFileError
from .hardware import detect_gpus, profile_for_device_name, resolve_profile
from .inventory import count_parameters, inventory
from .memory_trace import (
    Trace,
    cast_batch,
    extrapolate,
    fake_copy,
    quiet_fake_tensor_log,
    repeated_blocks,
    trace_forward_backward,
    trace_step,
    trace_training,
)
from .modelfile import ModelFile, _one_line, check_loss, default_loss, iter_tensors, load_model_file

DEFAULT_RESERVE_GB = 2.0
"""GiB held back from the GPU's memory: the CUDA context (~0.5 GiB with CUDA 12 lazy loading), cuBLAS/cuDNN
workspaces and caching-allocator fragmentation. Tune it with ``--reserve-gb`` after one real run
(``torch.cuda.mem_get_info`` vs ``max_memory_allocated``)."""
DEFAULT_GPU = "h100-sxm-80gb"
"""Profile judged against when no ``--gpu`` is given and no GPU is detected (said in ``settings.gpu_source``)."""
SHARDINGS = ("none", "zero1", "zero2", "fsdp")
MAX_BATCH_LIMIT = 1 << 20
"""Largest batch size ``max_batch_size`` searches up to."""
GiB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class MemorySettings:
    """Precision, sharding and hardware of the planned run."""

    batch_size: int = 8
    """Batch size passed to ``sample_batch``."""
    param_dtype: str | None = None
    """Parameter dtype (default: the model's own)."""
    grad_dtype: str | None = None
    """Gradient dtype (default: the parameter dtype)."""
    state_dtype: str | None = None
    """Optimizer-state dtype (default: the dtype the optimizer updates, as torch does)."""
    master_weights: bool = False
    """Keep an fp32 master copy of 16-bit parameters; the optimizer then updates the fp32 copy."""
    autocast: str | None = None
    """Run the forward under ``torch.autocast`` in this dtype (bf16 or fp16)."""
    checkpoint_blocks: bool = False
    """Activation-checkpoint each repeated block (children of the largest uniform ``nn.ModuleList``)."""
    world_size: int = 1
    """GPUs sharing the job."""
    sharding: str = "none"
    """none, zero1, zero2 or fsdp."""
    gpu: str | None = None
    """GPU profile name (default: the detected GPU, else :data:`DEFAULT_GPU`)."""
    reserve_gb: float = DEFAULT_RESERVE_GB
    """GiB of GPU memory not available to tensors (see :data:`DEFAULT_RESERVE_GB`)."""
    max_batch_size: bool = False
    """Also find the largest batch size that fits (bisection on traced steps)."""
    bucket_view: bool = False
    """Unsharded with world size > 1 (DDP): the run passes ``gradient_as_bucket_view=True``, so the gradients are
    views into DDP's all-reduce buckets instead of a second copy of them."""

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size!r} is out of range; allowed: an integer >= 1")
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ConfigError(f"--world-size {self.world_size!r} is out of range; allowed: an integer >= 1")
        sharding = getattr(self.sharding, "value", self.sharding)
        if sharding not in SHARDINGS:
            raise ConfigError(f"--sharding {self.sharding!r} is unknown; valid: {', '.join(SHARDINGS)}")
        object.__setattr__(self, "sharding", sharding)
        for name in ("param_dtype", "grad_dtype", "state_dtype"):
            if getattr(self, name) is not None:
                try:
                    parse_dtype(getattr(self, name))
                except ConfigError as e:
                    raise ConfigError(f"--{name.replace('_', '-')}: {e}") from e
        if self.autocast is not None and parse_dtype(self.autocast) not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"--autocast {self.autocast!r}: use bf16 or fp16")
        if not (self.reserve_gb >= 0 and math.isfinite(self.reserve_gb)):
            raise ConfigError(f"--reserve-gb {self.reserve_gb!r} is out of range; allowed: a finite number of GiB >= 0")


@dataclass(frozen=True)
class Target:
    """The GPU the estimate is judged against."""

    name: str
    memory_bytes: int
    source: str


def resolve_target(gpu: str | None) -> Target:
    """``--gpu`` profile, else the first detected GPU, else :data:`DEFAULT_GPU`."""
    if gpu:
        prof = resolve_profile(gpu)
        return Target(prof.name, int(prof.memory_bytes.value), "--gpu")
    report = detect_gpus()
    if report.gpus:
        g = report.gpus[0]
        prof = profile_for_device_name(g.name)
        return Target(prof.name if prof else g.name, g.memory_total, f"detected GPU {g.index} ({g.name})")
    prof = resolve_profile(DEFAULT_GPU)
    return Target(prof.name, int(prof.memory_bytes.value), "default (no GPU detected; pass --gpu PROFILE)")


def _fake_mode() -> FakeTensorMode:
    """A fake-tensor mode that also accepts real tensors the model keeps outside its parameters and buffers
    (a plain tensor attribute used in forward): they take part as constants and are not counted."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * itemsize(dtype)


def _scalar_loss(loss: Callable[[nn.Module, Any], torch.Tensor], path: str) -> Callable[[nn.Module, Any], Any]:
    """``loss`` with what it returns checked as the training loop checks it: a scalar tensor."""
    return lambda model, batch: check_loss(loss(model, batch), path)


def unused_note(names: Sequence[str]) -> str:
    """The note for trainable parameters that got no gradient in the traced step."""
    shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
    return (f"no gradient reached {shown} in the traced step: their gradients and optimizer state are counted "
            "as if used, though an optimizer creates neither for a parameter that never gets a gradient "
            "(freeze it with requires_grad_(False) if it is never used)")


def _shard(x: int, n: int) -> int:
    return -(-x // n)


@dataclass
class _Model:
    """What the estimate needs to know about the model, computed once."""

    module: nn.Module
    path: str
    parameters: int
    trainable: int
    infos: list[Any]
    blocks: tuple[str, nn.ModuleList] | None
    sample_batch: Callable[[int], Any] | None
    loss: Callable[[nn.Module, Any], torch.Tensor]
    traces: dict[tuple, tuple[Trace, str]] = field(default_factory=dict)


class MemoryPlanner:
    """Estimates for several optimizers on one model, sharing the forward/backward traces between them."""

    def __init__(self, model: nn.Module | str | Path | ModelFile, settings: MemorySettings | None = None, *,
                 sample_batch: Callable[[int], Any] | None = None,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        self.settings = settings or MemorySettings()
        self.target = resolve_target(self.settings.gpu)
        if self.settings.reserve_gb * GiB >= self.target.memory_bytes:
            raise ConfigError(f"--reserve-gb {self.settings.reserve_gb:g} keeps back all of {self.target.name}'s "
                              f"{self.target.memory_bytes / GiB:.2f} GiB; give less (default {DEFAULT_RESERVE_GB:g})")
        if isinstance(model, (str, Path)):
            model = load_model_file(model)
        if isinstance(model, ModelFile):
            mf = model
            module = mf.build()
            path = str(mf.path)
            sample_batch = sample_batch or (mf.sample_batch if mf.can_sample else None)
            loss = loss_fn or mf.raw_loss
        elif isinstance(model, nn.Module):
            module, path = model, type(model).__name__
            loss = loss_fn or default_loss
        else:
            raise ConfigError(f"model must be an nn.Module or a model-file path, not {type(model).__name__}")
        loss = _scalar_loss(loss, path)
        total, trainable = count_parameters(module)
        infos = inventory(module)
        if not infos:
            raise ConfigError(f"{path}: the model has no trainable parameters, so there is nothing to optimize; "
                              "leave requires_grad on for the parameters to train")
        self.m = _Model(module, path, total, trainable, infos, repeated_blocks(module), sample_batch, loss)
        s = self.settings
        # --param-dtype casts every floating parameter; without it each keeps its own dtype (a bf16 model may keep
        # its norms in fp32). The dtypes shown are the cast, else the one holding most parameters.
        self.cast = parse_dtype(s.param_dtype) if s.param_dtype else None
        numel: dict[torch.dtype, int] = {}
        for i in infos:
            numel[i.dtype] = numel.get(i.dtype, 0) + i.numel
        self.model_dtypes = numel
        self.param_dtype = self.cast or max(numel, key=lambda d: numel[d])
        self.master = master = bool(s.master_weights) and any(itemsize(self._p(i.dtype)) < 4 for i in infos)
        self.step_cast = torch.float32 if master else self.cast
        self.step_dtype = self.step_cast or self.param_dtype
        self.grad_cast = parse_dtype(s.grad_dtype) if s.grad_dtype else None
        self.grad_dtype = self.grad_cast or self.param_dtype
        self.state_dtype = parse_dtype(s.state_dtype) if s.state_dtype else (
            self.step_dtype if (s.param_dtype or master) else None)
        self._grad_ratio = (sum(_nbytes(i.shape, self._g(i.dtype)) for i in infos)
                            / sum(_nbytes(i.shape, self._p(i.dtype)) for i in infos))
        self._batch_bytes: dict[int, int] = {}

    def _p(self, dtype: torch.dtype) -> torch.dtype:
        """A floating parameter's dtype in the planned run."""
        return self.cast if self.cast is not None and dtype.is_floating_point else dtype

    def _g(self, dtype: torch.dtype) -> torch.dtype:
        """The gradient dtype of a parameter of ``dtype``."""
        return self.grad_cast or self._p(dtype)

    def _updated(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the optimizer updates for a parameter of ``dtype`` (its fp32 master copy, if any)."""
        return torch.float32 if self.master else self._p(dtype)

    # -- pieces -------------------------------------------------------------------------------------------------
    def _param_bytes(self, dtype: torch.dtype | None, *, trainable_only: bool) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.m.module.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += _nbytes(p.shape, dtype if dtype is not None and p.is_floating_point() else p.dtype)
        return total

    def _buffer_bytes(self) -> int:
        return sum(_nbytes(b.shape, self._p(b.dtype)) for b in self.m.module.buffers())

    def _batch(self, batch_size: int) -> Any:
        assert self.m.sample_batch is not None
        batch = self.m.sample_batch(batch_size)
        if self.settings.param_dtype and not self.settings.autocast:  # bf16 parameters are fed bf16 inputs
            batch = cast_batch(batch, self.param_dtype)
        self._batch_bytes[batch_size] = sum(t.numel() * t.element_size() for t in iter_tensors(batch))
        return batch

    def _n_blocks(self) -> int | None:
        return len(self.m.blocks[1]) if self.m.blocks else None

    def forward_backward(self, batch_size: int) -> tuple[Trace, str] | None:
        """The traced forward/backward at ``batch_size`` (cached), or None without a way to make a batch.

        Its backward peak is the instant with the most per-GPU bytes, gradients counted at their per-GPU share
        (:meth:`grad_share`): sharded gradients move the peak earlier, where more activations are alive."""
        if self.m.sample_batch is None:
            return None
        weight = self.grad_share() - 1.0
        key = ("fb", batch_size, weight)
        if key not in self.m.traces:
            batch = self._batch(batch_size)
            s = self.settings
            autocast = parse_dtype(s.autocast) if s.autocast else None

            def run(k: int | None) -> Trace:
                fm = fake_copy(self.m.module, _fake_mode(), param_dtype=self.cast, keep_blocks=k,
                               checkpoint_blocks=s.checkpoint_blocks)
                return trace_forward_backward(fm, batch, self.m.loss, autocast=autocast, grad_weight=weight)

            try:
                with quiet_fake_tensor_log():
                    self.m.traces[key] = extrapolate(run, self._n_blocks())
            except (ModelFileError, ConfigError):
                raise
            except Exception as e:
                raise ModelFileError(f"{self.m.path}: one training step on a batch of {batch_size} raised "
                                     f"{_one_line(e)} (traced on fake tensors); fix the model, sample_batch or "
                                     f"loss_fn") from e
        return self.m.traces[key]

    def grad_share(self) -> float:
        """Per-GPU gradient bytes per traced gradient byte: the gradients' bytes over the same gradients in their
        parameters' dtypes (what the trace makes), over the world size when gradients are sharded."""
        share = self._grad_ratio
        if self.settings.sharding in ("zero2", "fsdp"):
            share /= self.settings.world_size
        return share

    def step(self, name: str, hyperparameters: Mapping[str, Any], routing: Any,
             hooked: bool) -> tuple[Trace, str] | None:
        """The traced optimizer step; ``hooked`` optimizers (they hook the model) need whole training iterations,
        hence a batch (None without one). Traced with the optimizer's ``every_step_refresh`` hyperparameters, so
        both traced steps refresh and precondition from a state that exists: the largest step of the config."""
        hyperparameters, routing = po.with_spec_overrides(name, hyperparameters, routing, "every_step_refresh")
        # a hooked optimizer's trace is whole training iterations: it depends on the batch size and, like the
        # forward/backward trace, on where the per-GPU backward peaks (grad_share)
        weight = self.grad_share() - 1.0 if hooked else 0.0
        key = ("step", name, repr(sorted(hyperparameters.items())), repr(routing),
               self.settings.batch_size if hooked else None, weight)
        if hooked and self.m.sample_batch is None:
            return None
        if key not in self.m.traces:
            def build(model: nn.Module) -> torch.optim.Optimizer:
                return po.build(name, model, routing=routing, **hyperparameters)

            s = self.settings
            batch = self._batch(s.batch_size) if hooked else None
            if batch is not None and self.master and not s.autocast:
                # the whole-iteration trace runs on the updated (fp32 master) copy: feed it that dtype
                batch = cast_batch(batch, self.step_cast)
            autocast = parse_dtype(s.autocast) if s.autocast else None

            def run(k: int | None) -> Trace:
                fm = fake_copy(self.m.module, _fake_mode(), param_dtype=self.step_cast, keep_blocks=k,
                               checkpoint_blocks=s.checkpoint_blocks and hooked)
                if hooked:
                    return trace_training(fm, batch, self.m.loss, build, autocast=autocast, grad_weight=weight)
                return trace_step(fm, build)  # torch requires .grad in the parameter's dtype

            with quiet_fake_tensor_log():
                self.m.traces[key] = extrapolate(run, self._n_blocks(), check=False)
        return self.m.traces[key]

    # -- the estimate -------------------------------------------------------------------------------------------
    def estimate(self, optimizer: str, hyperparameters: Mapping[str, Any] | None = None,
                 routing: Any = None) -> dict[str, Any]:
        """One entry of ``memory --json`` for ``optimizer``."""
        s = self.settings
        hp = dict(hyperparameters or {})
        spec = po.get_spec(optimizer)
        name = spec.name
        assignments = po.route(name, self.m.infos, routing, **hp)  # validates names and values early
        n_world = s.world_size
        weights = self._param_bytes(self.cast, trainable_only=False)
        buffers = self._buffer_bytes()
        master = 4 * sum(i.numel for i in self.m.infos if itemsize(self._p(i.dtype)) < 4) if self.master else 0
        grads = sum(_nbytes(i.shape, self._g(i.dtype)) for i in self.m.infos)
        state = po.state_bytes(name, self.m.infos, routing=routing, state_dtype=self.state_dtype, **hp)
        traced_state_dtype_state = po.state_bytes(name, self.m.infos, routing=routing,
                                                  state_dtype=self.step_cast if self.state_dtype else None, **hp)
        notes: list[str] = []
        if self.cast is None and len(self.model_dtypes) > 1:
            mix = ", ".join(f"{dtype_name(d)} ({n:,})" for d, n in sorted(self.model_dtypes.items(), key=lambda kv: -kv[1]))
            notes.append(f"parameters in {mix}: each counted in its own dtype")
        if s.checkpoint_blocks and not self.m.blocks:
            notes.append("--checkpoint-blocks: the model has no repeated blocks (an nn.ModuleList of identical "
                         "children), so nothing was checkpointed")
        if s.master_weights and not self.master:
            notes.append("--master-weights: the parameters are already fp32, so there is no master copy to count "
                         "(it applies with --param-dtype bf16/fp16)")
        if self.cast == torch.float16 and not s.master_weights:
            notes.append("--param-dtype fp16 without --master-weights: pure float16 weights do not train with the "
                         "bundled optimizers (their float16 state over- or underflows); plan fp16 training with "
                         "--autocast fp16, or --param-dtype fp16 --master-weights")
        if s.bucket_view and not (s.sharding == "none" and s.world_size > 1):
            notes.append("--bucket-view changes nothing here: it applies to DDP (--sharding none, --world-size > 1)")

        hooked = any(a.spec.make is not None for a in assignments)
        traced = self.step(name, hp, routing, hooked)
        refreshing = sorted({a.spec.name for a in assignments if a.spec.every_step_refresh})
        if refreshing and traced is not None:
            knobs = "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in po.get_spec(n).every_step_refresh.items())
                              for n in refreshing)
            notes.append(f"step traced as a refresh step ({knobs}): the largest step, whatever the refresh period")
        upcast, upcast_dtype = 0, ""
        if traced is None:
            step_trace, step_how, temporaries = Trace(), "not traced (needs a batch: the optimizer hooks the model)", 0
            notes.append(f"{name}'s step was not traced: it hooks the model's layers and needs a batch (define "
                         "sample_batch in the model file), so step_temporaries 0 and the peak are under-counts")
        else:
            step_trace, step_how = traced
            step_peak = step_trace.peaks.get("step", 0)
            persistent = sum(step_trace.after.get(k, 0)
                             for k in ("Parameter", "Buffer", "Gradient", "Optstate", "Other"))
            temporaries = max(0, step_peak - persistent)
            cast = [i for i in self.m.infos if self._g(i.dtype) != self._updated(i.dtype)]
            if cast:  # gradients cast to the updated copy's dtype for the step (added below, per GPU)
                upcast = sum(_nbytes(i.shape, self._updated(i.dtype)) for i in cast)
                upcast_dtype = dtype_name(self._updated(cast[0].dtype))
        if self.state_dtype is not None and state != traced_state_dtype_state:
            notes.append(f"state traced in {dtype_name(self.step_dtype)}, counted in {dtype_name(self.state_dtype)}")

        # per-GPU shares under sharding
        w_gpu = _shard(weights, n_world) if s.sharding == "fsdp" else weights
        m_gpu = _shard(master, n_world) if s.sharding != "none" else master
        g_gpu = _shard(grads, n_world) if s.sharding in ("zero2", "fsdp") else grads
        st_gpu = _shard(state, n_world) if s.sharding != "none" else state
        # DistributedDataParallel allocates all-reduce buckets as large as all the gradients when it is built;
        # unless the gradients are views into them (gradient_as_bucket_view=True) they are a second copy, alive
        # in every phase
        buckets = grads if s.sharding == "none" and n_world > 1 and not s.bucket_view else 0
        if buckets:
            notes.append(f"world size {n_world} unsharded (DDP): its all-reduce buckets hold a second copy of the "
                         f"gradients (+{buckets} B in every phase); DistributedDataParallel("
                         "gradient_as_bucket_view=True) makes the gradients views into them (--bucket-view)")
        gather_fwd = gather_bwd = 0
        if s.sharding != "none" and n_world > 1:
            # a matrix optimizer's update needs the whole matrix: the largest matrix any of them owns is gathered
            owned = [a for a in assignments if not a.spec.elementwise and len(a.info.shape) >= 2]
            if owned:
                big = max(owned, key=lambda a: a.info.numel)
                gathered = _nbytes(big.info.shape, self._g(big.info.dtype))
                temporaries += gathered
                notes.append(f"{big.spec.name} updates whole matrices: the largest ({big.info.name}, "
                             f"{tuple(big.info.shape)}) is gathered for its update (+{gathered} B in step_temporaries)")
            if all(a.spec.elementwise for a in assignments):
                # each rank updates its shard only: the temporaries of a multi-tensor sweep shrink with it
                temporaries = _shard(temporaries, n_world)
                notes.append(f"{name} is elementwise: each GPU updates its shard, step_temporaries divided by "
                             f"{n_world}")
            if s.sharding == "fsdp":
                gather_fwd, unit_grads = self._fsdp_gathered()
                gather_bwd = gather_fwd + 2 * unit_grads  # a unit's unsharded gradients and their reduce-scatter copy
                notes.append("fsdp: all-gathered units counted (root parameters and two blocks: current and "
                             "prefetched; in backward also one block's gradients and its reduce-scatter input)")
                unsharded = sorted({a.spec.name for a in assignments
                                    if not getattr(a.spec.optimizer_cls, "runs_on_dtensor", False)})
                if unsharded:
                    one = len(unsharded) == 1
                    notes.append(f"fsdp: precondtune's {', '.join(unsharded)} {'runs' if one else 'run'} on whole "
                                 f"parameters and {'refuses' if one else 'refuse'} FSDP2's sharded ones; this plan "
                                 "is for an implementation that shards its state")

        if upcast:  # each GPU casts the gradients of the parameters it updates: its shard under ZeRO/FSDP
            upcast = _shard(upcast, n_world) if s.sharding != "none" else upcast
            temporaries += upcast
            notes.append(f"gradients cast to {upcast_dtype} for the step (+{upcast} B"
                         f"{' per GPU' if s.sharding != 'none' and n_world > 1 else ''} in step_temporaries)")
        fb = self.forward_backward(s.batch_size)
        batch_bytes = self._batch_bytes.get(s.batch_size, 0)
        phases: dict[str, int] = {}
        activations = 0
        fb_how = None
        if fb is not None:
            trace, fb_how = fb
            for phase in ("forward", "backward"):
                snap = trace.snaps.get(phase, {})
                fixed = snap.get("Parameter", 0) + snap.get("Buffer", 0) + snap.get("Other", 0)
                g_now = int(snap.get("Gradient", 0) * self._grad_ratio)
                if s.sharding in ("zero2", "fsdp"):
                    g_now = _shard(g_now, n_world)
                act = trace.peaks[phase] - fixed - snap.get("Gradient", 0)
                activations = max(activations, act)
                gather = gather_fwd if phase == "forward" else gather_bwd
                if hooked and traced is not None:  # what the optimizer's hooks keep alive in this phase
                    gather += max(0, step_trace.peaks[phase] - traced_state_dtype_state - trace.peaks[phase])
                phases[phase] = (w_gpu + buffers + snap.get("Other", 0) + m_gpu + st_gpu + act + g_now + gather
                                 + buckets)
        step_total = w_gpu + buffers + batch_bytes + m_gpu + g_gpu + st_gpu + temporaries + buckets
        phases["step"] = step_total
        peak_phase = max(phases, key=lambda k: phases[k])
        total = phases[peak_phase]
        capacity = self.target.memory_bytes - int(s.reserve_gb * GiB)
        entry: dict[str, Any] = {
            "name": name,
            "hyperparameters": hp,
            "bytes": {
                "weights": w_gpu + buffers, "gradients": g_gpu, "optimizer_state": st_gpu,
                "activations": activations, "step_temporaries": temporaries, "total_peak": total,
                "master_weights": m_gpu, "ddp_buckets": buckets,
            },
            "fits": total <= capacity,
            "headroom_bytes": capacity - total,
            "peak_phase": peak_phase,
            "phases": phases,
            "activations_traced": fb is not None,
            "trace": {"forward_backward": fb_how, "step": step_how},
            "notes": notes,
        }
        if fb is None:
            notes.append("activations not traced: no sample_batch to make a batch (define sample_batch in the model file; "
                         "in Python pass sample_batch=)")
        else:
            if fb[0].bounded or (traced is not None and traced[0].bounded):
                notes.append("a boolean mask's selection (e.g. logits[labels != -100]) was counted at its largest, "
                             "every element selected: an upper bound, reached by a padding mask on a batch without "
                             "padding, far above any real batch for a routing mask (x[route == e])")
            if fb[0].no_grad:
                notes.append(unused_note(fb[0].no_grad))
            if fb[0].scalar_reads:
                notes.append(f"the forward/backward read {fb[0].scalar_reads} tensor value(s) (.item(), int(t), "
                             "if t:), taken as 1 or True on fake tensors; a shape computed from one is traced at "
                             "that value")
        if s.max_batch_size:
            entry["max_batch_size"] = found = self._max_batch(entry, capacity)
            if found is None:
                notes.append("max_batch_size not searched: no sample_batch to make batches")
            elif found >= MAX_BATCH_LIMIT:
                notes.append(f"max_batch_size: the search stops at {MAX_BATCH_LIMIT}; larger batches fit too")
        return entry

    def _fsdp_gathered(self) -> tuple[int, int]:
        """(unsharded parameter bytes alive at once, unsharded gradient bytes of one unit) under FSDP."""
        all_w = self._param_bytes(self.cast, trainable_only=False)
        if self.m.blocks is None:
            return all_w, sum(_nbytes(i.shape, self._g(i.dtype)) for i in self.m.infos)
        block = self.m.blocks[1][0]
        block_w = sum(_nbytes(p.shape, self._p(p.dtype)) for p in block.parameters())
        block_g = sum(_nbytes(p.shape, self._g(p.dtype)) for p in block.parameters() if p.requires_grad)
        root_w = all_w - len(self.m.blocks[1]) * block_w
        return root_w + 2 * block_w, block_g

    def _max_batch(self, entry: dict[str, Any], capacity: int) -> int | None:
        """Largest batch size whose traced peak fits (0: not even 1; None: no batch can be made)."""
        if self.m.sample_batch is None:
            return None
        name, hp = entry["name"], entry["hyperparameters"]
        if entry["phases"]["step"] > capacity and po.get_spec(name).make is None:
            return 0  # the step alone does not fit and does not shrink with the batch (a hooked one's does)

        def fits(b: int) -> bool:
            sub = MemoryPlanner.__new__(MemoryPlanner)
            sub.__dict__.update(self.__dict__)
            sub.settings = replace(self.settings, batch_size=b, max_batch_size=False)
            return bool(sub.estimate(name, hp)["fits"])

        if not fits(1):
            return 0
        lo, hi = 1, 2
        while hi <= MAX_BATCH_LIMIT and fits(hi):
            lo, hi = hi, hi * 2
        if hi > MAX_BATCH_LIMIT:
            return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    # -- the document -------------------------------------------------------------------------------------------
    def settings_doc(self) -> dict[str, Any]:
        s = self.settings
        return {
            "param_dtype": dtype_name(self.param_dtype), "grad_dtype": dtype_name(self.grad_dtype),
            "state_dtype": dtype_name(self.state_dtype or self.step_dtype), "master_weights": self.master,
            "autocast": s.autocast, "checkpoint_blocks": s.checkpoint_blocks, "batch_size": s.batch_size,
            "world_size": s.world_size, "sharding": s.sharding, "gpu": self.target.name,
            "gpu_source": self.target.source, "gpu_memory_bytes": self.target.memory_bytes,
            "reserve_bytes": int(s.reserve_gb * GiB),
            "repeated_blocks": None if self.m.blocks is None else
            {"path": self.m.blocks[0], "count": len(self.m.blocks[1])},
        }

    def model_doc(self) -> dict[str, Any]:
        return {"path": self.m.path, "parameters": self.m.parameters, "trainable_parameters": self.m.trainable}


def plan_memory(model: nn.Module | str | Path | ModelFile, optimizers: str | Iterable[str] = "all",
                settings: MemorySettings | None = None, *, hyperparameters: Mapping[str, Mapping[str, Any]] | None = None,
                sample_batch: Callable[[int], Any] | None = None,
                loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The whole ``memory --json`` document: model, settings and one entry per optimizer."""
    names = po.resolve_names(optimizers)
    planner = MemoryPlanner(model, settings, sample_batch=sample_batch, loss_fn=loss_fn)
    entries = []
    for k, name in enumerate(names):
        if progress:
            progress("tracing optimizer steps", k, len(names))
        entries.append(planner.estimate(name, (hyperparameters or {}).get(name)))
    if progress:
        progress("tracing optimizer steps", len(names), len(names))
    return {"model": planner.model_doc(), "settings": planner.settings_doc(), "optimizers": entries}


def estimate_memory(model: nn.Module | str | Path, optimizer: str, *,
                    sample_batch: Callable[[int], Any] | None = None,
                    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                    batch_size: int | None = None, routing: Any = None,
                    hyperparameters: Mapping[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
    """The memory budget of one optimizer: one entry of ``precondtune memory --json`` (SPEC.md, Python API).

    ``model`` is an ``nn.Module`` (then ``sample_batch(batch_size)``/``loss_fn(model, batch)`` enable activation
    tracing) or a model-file path (they come from the file). ``settings`` are :class:`MemorySettings` fields
    (``param_dtype``, ``state_dtype``, ``world_size``, ``sharding``, ``gpu``, ...). Optimizer state never needs a
    batch; without one, activations are 0 and ``"activations_traced"`` is false.
    """
    valid = set(MemorySettings.__dataclass_fields__)
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ConfigError(f"estimate_memory: unknown setting {unknown[0]!r}; valid: {', '.join(sorted(valid))}")
    if batch_size is not None:
        settings["batch_size"] = batch_size
    planner = MemoryPlanner(model, MemorySettings(**settings), sample_batch=sample_batch, loss_fn=loss_fn)
    entry = planner.estimate(optimizer, hyperparameters, routing)
    entry["settings"] = planner.settings_doc()
    return entry
