from __future__ import annotations

import datetime as _dt
import shlex
import sys
from pathlib import Path
from typing import Annotated

import optuna
import typer

from ...errors import ConfigError
from ...modelfile import load_model_file
from ...plan import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    DEFAULT_TRIALS,
    PlanSettings,
    plan,
    recommended_config,
    write_outputs,
)
from ...search import AdamWReference
from ..common import (
    DebugOpt,
    DeviceOpt,
    GpuOpt,
    JsonOpt,
    ModelArg,
    SeedOpt,
    Sharding,
    ShardingOpt,
    WorldSizeOpt,
    emit_json,
    handle_errors,
    human_bytes,
    progress,
    stderr,
    stdout,
    table,
)

NAME = "plan"
HELP = ("The whole pipeline: profile, memory, overhead, searches against a tuned-AdamW baseline, ranking; writes "
        "recommended.yaml, report.md, plots and results.csv.")


def _floats(text: str | None, option: str, n: int) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give {n} comma-separated numbers, e.g. 0.9,0.95") from None
    if len(values) != n:
        raise ConfigError(f"{option} {text!r}: give {n} comma-separated numbers, e.g. 0.9,0.95")
    return values


def command(
    model: ModelArg,
    optimizer: Annotated[str, typer.Option("--optimizer", "-o", help="NAME[,NAME...] or all.")] = "all",
    gpu: GpuOpt = None,
    world_size: WorldSizeOpt = 1,
    sharding: ShardingOpt = Sharding.none,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size passed to sample_batch.")] =
    DEFAULT_BATCH_SIZE,
    param_dtype: Annotated[str | None, typer.Option("--param-dtype", help="fp32, bf16, fp16.")] = None,
    state_dtype: Annotated[str | None, typer.Option("--state-dtype", help="Optimizer state dtype.")] = None,
    reserve_gb: Annotated[float | None, typer.Option("--reserve-gb", help="GiB held back per GPU.")] = None,
    adam_lr: Annotated[float | None, typer.Option("--adam-lr", help="Your tuned AdamW learning rate.")] = None,
    adam_betas: Annotated[str | None, typer.Option("--adam-betas", help="Your AdamW betas, e.g. 0.9,0.95.")] = None,
    adam_weight_decay: Annotated[float | None, typer.Option("--adam-weight-decay", help="Your AdamW weight decay.")]
    = None,
    trials: Annotated[int, typer.Option("--trials", help="New trials per optimizer.")] = DEFAULT_TRIALS,
    steps: Annotated[int, typer.Option("--steps", help="Steps per trial.")] = DEFAULT_STEPS,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per ranking run.")] = DEFAULT_SEEDS,
    rank_by: Annotated[str, typer.Option("--rank-by", help="time (equal wall-clock) or steps.")] = "time",
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default reports/<model>-<time>/).")]
    = None,
    storage: Annotated[str | None, typer.Option("--storage", help="Optuna storage URL (default: SQLite file).")]
    = None,
    study_name: Annotated[str | None, typer.Option("--study-name", help="Prefix of the studies' names.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Processes per search.")] = 1,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds per search.")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    with handle_errors(debug):
        if (adam_betas is not None or adam_weight_decay is not None) and adam_lr is None:
            raise ConfigError("--adam-betas/--adam-weight-decay need --adam-lr (the tuned AdamW to transfer from)")
        adamw = None
        if adam_lr is not None:
            if adam_lr <= 0:
                raise ConfigError(f"--adam-lr {adam_lr}: give a positive learning rate")
            kw = {}
            if adam_betas is not None:
                kw["betas"] = _floats(adam_betas, "--adam-betas", 2)
            if adam_weight_decay is not None:
                kw["weight_decay"] = adam_weight_decay
            adamw = AdamWReference(lr=adam_lr, **kw)
        settings = PlanSettings(optimizers=optimizer, batch_size=batch_size, trials=trials, steps=steps, seeds=seeds,
                                rank_by=rank_by, storage=storage, study_prefix=study_name, workers=workers,
                                timeout=timeout, device=device, gpu=gpu, reserve_gb=reserve_gb, world_size=world_size,
                                sharding=sharding.value, param_dtype=param_dtype, state_dtype=state_dtype,
                                adamw=adamw, seed=seed)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        mf = load_model_file(model)
        with progress(enabled=True) as update:
            result = plan(mf, settings, progress=update, log=lambda m: stderr.print(m, highlight=False))
        result.command = "precondtune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
        target = out or Path("reports") / f"{mf.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        files = write_outputs(result, target)
        doc = {
            "model": result.memory["model"], "winner": result.winner, "reason": result.reason,
            "out": str(target), "files": {k: str(v) for k, v in files.items()}, "storage": result.storage,
            "rank_by": settings.rank_by,
            "recommended": recommended_config(result) if result.winner else None,
            "optimizers": [{"name": c.name, "status": c.status, "note": c.note, "fits": c.fits,
                            "median_eval_loss": c.median, "seed_losses": c.rank_losses, "rank_steps": c.rank_steps,
                            "step_seconds": c.step_seconds, "hyperparameters": c.hyperparameters,
                            "bytes": c.memory["bytes"], "overhead": c.cost["overhead"] if c.cost else None}
                           for c in result.candidates],
            "seconds": result.seconds,
        }
        if json_:
            emit_json(doc)
        else:
            rows = sorted(result.candidates, key=lambda c: (c.median is None, c.median or 0.0))
            stdout.print(table(f"plan for {mf.path}", ["optimizer", "eval loss (median)", "spread", "steps",
                                                       "peak memory", "status"],
                               [[c.name + (" ★" if c.name == result.winner else ""),
                                 "-" if c.median is None else f"{c.median:.4f}",
                                 f"{c.spread:.4f}" if c.rank_losses else "-", c.rank_steps or "-",
                                 human_bytes(c.memory["bytes"]["total_peak"]), c.status] for c in rows]))
            if result.winner:
                stdout.print(f"recommended: [bold]{result.winner}[/bold] — {result.reason}", highlight=False)
            else:
                stdout.print(f"no recommendation: {result.reason}", highlight=False)
            stdout.print(f"wrote {target}/ (report.md, recommended.yaml, plots, results.csv)", highlight=False)
        if not any(c.fits for c in result.candidates) or (result.winner is None and not result.meta):
            raise typer.Exit(1)
