from __future__ import annotations

from typing import Annotated

import typer

from ...memory import DEFAULT_RESERVE_GB, MAX_BATCH_LIMIT, MemorySettings, plan_memory
from ...modelfile import load_model_file
from ..common import (
    AutocastOpt,
    BatchOpt,
    BucketViewOpt,
    CheckpointBlocksOpt,
    DebugOpt,
    GpuOpt,
    GradDtypeOpt,
    JsonOpt,
    MasterWeightsOpt,
    MaxBatchOpt,
    ModelArg,
    OptimizerOpt,
    ReserveGbOpt,
    StateDtypeOpt,
    emit_json,
    handle_errors,
    human_bytes,
    progress,
    stderr,
    stdout,
    table,
)

NAME = "memory"
HELP = "Per-GPU memory per optimizer: weights, gradients, state, activations, step temporaries, peak and fit."


def command(
    model: ModelArg,
    optimizer: OptimizerOpt = "all",
    batch_size: BatchOpt = 8,
    param_dtype: Annotated[str | None, typer.Option("--param-dtype",
                                                    help="fp32, bf16, fp16 or fp64 (default: the model's).")] = None,
    grad_dtype: GradDtypeOpt = None,
    state_dtype: StateDtypeOpt = None,
    master_weights: MasterWeightsOpt = False,
    autocast: AutocastOpt = None,
    checkpoint_blocks: CheckpointBlocksOpt = False,
    world_size: Annotated[int, typer.Option("--world-size", help="GPUs sharing the job.")] = 1,
    sharding: Annotated[str, typer.Option("--sharding", help="none, zero1, zero2 or fsdp.")] = "none",
    bucket_view: BucketViewOpt = False,
    gpu: GpuOpt = None,
    reserve_gb: ReserveGbOpt = DEFAULT_RESERVE_GB,
    max_batch_size: MaxBatchOpt = False,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    with handle_errors(debug):
        settings = MemorySettings(
            batch_size=batch_size, param_dtype=param_dtype, grad_dtype=grad_dtype, state_dtype=state_dtype,
            master_weights=master_weights, autocast=autocast, checkpoint_blocks=checkpoint_blocks,
            world_size=world_size, sharding=sharding, gpu=gpu, reserve_gb=reserve_gb, max_batch_size=max_batch_size,
            bucket_view=bucket_view)
        with progress(stderr.is_terminal) as update:
            doc = plan_memory(load_model_file(model), optimizer, settings, progress=update)
        if json_:
            emit_json(doc)
            return
        _render(doc)


def _render(doc: dict) -> None:
    s, m = doc["settings"], doc["model"]
    columns = ["optimizer", "state", "activations", "step temps", "peak (phase)", "fits", "headroom"]
    if any("max_batch_size" in o for o in doc["optimizers"]):
        columns.append("max batch")
    rows = []
    for o in doc["optimizers"]:
        b = o["bytes"]
        row = [o["name"], human_bytes(b["optimizer_state"]),
               human_bytes(b["activations"]) if o["activations_traced"] else "- (no batch)",
               human_bytes(b["step_temporaries"]), f"{human_bytes(b['total_peak'])} ({o['peak_phase']})",
               "✓" if o["fits"] else "✗", human_bytes(o["headroom_bytes"])]
        if "max batch" in columns:
            found = o.get("max_batch_size")
            row.append("-" if found is None else "none (not 1)" if found == 0
                       else f"≥ {found:,}" if found >= MAX_BATCH_LIMIT else f"{found:,}")
        rows.append(row)
    first = doc["optimizers"][0]["bytes"] if doc["optimizers"] else None
    master = f" + {human_bytes(first['master_weights'])} fp32 master copy" if first and first["master_weights"] else ""
    wg = "" if first is None else (f"weights {human_bytes(first['weights'])}{master}, "
                                   f"gradients {human_bytes(first['gradients'])}; ")
    caption = (f"per GPU; {wg}{s['param_dtype']} params, {s['grad_dtype']} grads, {s['state_dtype']} state"
               f"{', fp32 master weights' if s['master_weights'] else ''}"
               f"{', autocast ' + s['autocast'] if s['autocast'] else ''}"
               f"{', checkpointed blocks' if s['checkpoint_blocks'] else ''}; batch {s['batch_size']}; "
               f"world size {s['world_size']}, sharding {s['sharding']}; fit against {s['gpu']} "
               f"({human_bytes(s['gpu_memory_bytes'])}, {s['gpu_source']}) less a "
               f"{human_bytes(s['reserve_bytes'])} reserve (--reserve-gb)")
    stdout.print(table(f"{m['path']}: one training step, {m['trainable_parameters']:,} trainable parameters",
                       columns, rows, caption=caption))
    notes = sorted({n for o in doc["optimizers"] for n in o["notes"]})
    for n in notes:
        stdout.print(f"note: {n}", highlight=False, soft_wrap=True, markup=False)
