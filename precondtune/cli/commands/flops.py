from __future__ import annotations

import math
from typing import Annotated

import typer

from ...flops import DEFAULT_MATMUL_DTYPE, DEFAULT_MBU, DEFAULT_MFU, FlopsReport, flops_report
from ...modelfile import load_model_file
from ...profiling import FLOP_METHOD
from ..common import (
    BatchOpt,
    DebugOpt,
    DeviceOpt,
    GpuOpt,
    JsonOpt,
    MbuOpt,
    MfuOpt,
    ModelArg,
    OptimizerOpt,
    SeedOpt,
    TokensPerBatchOpt,
    emit_json,
    handle_errors,
    human_count,
    progress,
    stdout,
    table,
)

NAME = "flops"
HELP = "Each optimizer's FLOPs (every step and amortized refreshes) and time against forward+backward."


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}" if abs(x) >= 0.001 else f"{x:+.3%}"


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def render(r: FlopsReport) -> None:
    """The rich table, one row per optimizer, sorted by FLOP overhead."""
    cols = ["optimizer", "step FLOPs", "refresh step", "every", "amortized", "overhead", "B/param"]
    predict = r.gpu is not None
    measure = any(o.measured for o in r.optimizers)
    if predict:
        cols += ["predicted step", "vs AdamW"]
    if measure:
        cols += ["measured (median)", "refresh step", "vs AdamW"]
    rows = []
    for o in r.optimizers:
        row = [o.name, human_count(o.step_flops), human_count(o.refresh_step_flops) if o.refresh_every else "-",
               o.refresh_every or "-", human_count(o.amortized_step_flops),
               "-" if not math.isfinite(o.overhead) else f"{o.overhead:.3%}" if o.overhead < 0.01
               else f"{o.overhead:.2%}", f"{o.bytes_per_parameter:.1f}"]
        if predict:
            p = o.predicted
            row += [_ms(p.step_seconds if p else None), _pct(o.predicted_time_overhead)]
        if measure:
            m = o.measured
            refresh = "-"
            if m and m.refresh_step_seconds is not None:
                refresh = f"{_ms(m.refresh_step_seconds)} (step {m.refresh_step})"
            row += [_ms(m.step_seconds if m else None), refresh, _pct(o.measured_time_overhead)]
        rows.append(row)
    notes = [(f"F (forward+backward) = {human_count(r.train_flops_per_step, 'FLOP')} per step at "
              f"{r.tokens_per_batch:,} tokens ({FLOP_METHOD}); overhead = amortized FLOPs / F; "
              "B/param = bytes the elementwise part moves per parameter per step")]
    if not r.train_flops_per_step:
        notes.append("FlopCounterMode counts matmuls, convolutions and attention, and finds none in this model's "
                     "forward+backward: no overhead ratio")
    if predict:
        assert r.gpu is not None
        notes.append(f"predicted on {r.gpu.title}: matmuls at MFU {r.mfu:.0%} of {r.matmul_dtype} peak "
                     f"{human_count(r.gpu.peak_flops(r.matmul_dtype), 'FLOP/s')}, elementwise at {r.mbu:.0%} of "
                     f"{human_count(r.gpu.memory_bandwidth.value, 'B/s')}")
    if measure:
        notes.append(f"measured on {r.device}: whole training steps; time overheads use the amortized step time")
    stdout.print(table(f"{r.path}: optimizer compute per step", cols, rows, caption="\n".join(notes)))


def command(
    model: ModelArg,
    optimizer: OptimizerOpt = "all",
    batch_size: BatchOpt = 8,
    tokens_per_batch: TokensPerBatchOpt = None,
    measure: Annotated[bool, typer.Option("--measure", help="Time warm-up + N real steps per optimizer.")] = False,
    steps: Annotated[int, typer.Option("--steps", min=1,
                                       help="Timed steps per optimizer (raised to cover a refresh).")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps before timing.")] = 3,
    device: DeviceOpt = "auto",
    gpu: GpuOpt = None,
    mfu: MfuOpt = DEFAULT_MFU,
    mbu: MbuOpt = DEFAULT_MBU,
    matmul_dtype: Annotated[str, typer.Option("--matmul-dtype", help="Dtype whose peak FLOP/s --gpu uses "
                                                                     "(bf16, fp16, fp32).")] = DEFAULT_MATMUL_DTYPE,
    seed: SeedOpt = 0,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    with handle_errors(debug):
        with progress(measure) as update:
            report = flops_report(load_model_file(model), optimizer, batch_size=batch_size,
                                  tokens_per_batch=tokens_per_batch, measure=measure, steps=steps,
                                  warmup=warmup, device=device, gpu=gpu, mfu=mfu, mbu=mbu,
                                  matmul_dtype=matmul_dtype, seed=seed, progress=update)
        if json_:
            emit_json(report.as_json())
        else:
            render(report)
