from __future__ import annotations

from typing import Annotated

import typer

from ...modelfile import load_model_file
from ...profiling import FLOP_METHOD, profile_model
from ..common import (
    BatchOpt,
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    ModelArg,
    SeedOpt,
    emit_json,
    handle_errors,
    human_count,
    stdout,
    table,
)

NAME = "profile"
HELP = "Parameter inventory by role, forward+backward FLOPs per step, tokens per batch, measured step time."


def command(
    model: ModelArg,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    tokens_per_batch: Annotated[int | None, typer.Option("--tokens-per-batch", min=1,
                                                         help="Override tokens per batch.")] = None,
    steps: Annotated[int, typer.Option("--steps", min=0, help="Timed steps (median reported).")] = 5,
    seed: SeedOpt = 0,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    with handle_errors(debug):
        prof = profile_model(load_model_file(model), batch_size=batch_size, device=device,
                             tokens_per_batch=tokens_per_batch, measure_steps=steps, seed=seed)
        if json_:
            emit_json(prof.as_json())
            return
        rows = [[role, f"{n:,}", f"{n / max(prof.trainable_parameters, 1):.1%}"]
                for role, n in prof.roles.items() if n]
        stdout.print(table(f"{prof.path}: {prof.trainable_parameters:,} trainable parameters "
                           f"({prof.parameters:,} in all)", ["role", "parameters", "share"], rows))
        step = "-" if prof.step_seconds is None else f"{prof.step_seconds * 1e3:.1f} ms"
        stdout.print(table("one training step (forward+backward)", ["quantity", "value"], [
            ["batch size", prof.batch_size],
            ["tokens per batch", f"{prof.tokens_per_batch:,}"],
            ["FLOPs per step", human_count(prof.train_flops_per_step, "FLOP")],
            ["device", prof.device],
            ["measured step time (median)", step if not prof.meta else "- (meta-device model: not runnable)"],
        ], caption=f"FLOPs: {FLOP_METHOD}"))
