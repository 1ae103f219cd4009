from __future__ import annotations

import datetime as _dt
import shlex
import sys
from pathlib import Path
from typing import Annotated

import optuna
import typer
from rich.markup import escape

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
from ...search import adamw_reference
from ..common import (
    AdamBetasOpt,
    AdamLrOpt,
    AdamWdOpt,
    BucketViewOpt,
    DebugOpt,
    DeviceOpt,
    GpuOpt,
    JsonOpt,
    ModelArg,
    SeedOpt,
    Sharding,
    ShardingOpt,
    StorageOpt,
    TimeoutOpt,
    TrialStepsOpt,
    WorkersOpt,
    WorldSizeOpt,
    check_writable,
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


def command(
    model: ModelArg,
    optimizer: Annotated[str, typer.Option("--optimizer", "-o", help="NAME[,NAME...] or all.")] = "all",
    gpu: GpuOpt = None,
    world_size: WorldSizeOpt = 1,
    sharding: ShardingOpt = Sharding.none,
    bucket_view: BucketViewOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size passed to sample_batch.")] =
    DEFAULT_BATCH_SIZE,
    param_dtype: Annotated[str | None, typer.Option("--param-dtype", help="fp32, bf16, fp16.")] = None,
    state_dtype: Annotated[str | None, typer.Option("--state-dtype", help="Optimizer state dtype.")] = None,
    reserve_gb: Annotated[float | None, typer.Option("--reserve-gb", help="GiB held back per GPU.")] = None,
    adam_lr: AdamLrOpt = None,
    adam_betas: AdamBetasOpt = None,
    adam_weight_decay: AdamWdOpt = None,
    trials: Annotated[int, typer.Option("--trials", min=1, help="Trials per optimizer; a rerun with the same "
                                        "--storage tops each study up to this count.")] = DEFAULT_TRIALS,
    steps: TrialStepsOpt = DEFAULT_STEPS,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds each best config is re-run on for the "
                                       "ranking (2+ measures the noise).")] = DEFAULT_SEEDS,
    rank_by: Annotated[str, typer.Option("--rank-by", help="time (equal wall-clock) or steps.")] = "time",
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default reports/<model>-<time>/).")]
    = None,
    fmt: Annotated[str, typer.Option("--format", help="recommended config as yaml or json.")] = "yaml",
    storage: StorageOpt = None,
    study_name: Annotated[str | None, typer.Option("--study-name", help="Prefix of the studies' names.")] = None,
    workers: WorkersOpt = 1,
    timeout: TimeoutOpt = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="[NAME:]KEY=VALUE: fix a knob for every planned "
                                                   "optimizer that has it, or for NAME only (repeatable).")] = None,
    enqueue: Annotated[list[str] | None, typer.Option("--enqueue", help="[NAME:]KEY=VALUE[,KEY=VALUE...]: a "
                                                      "warm-start trial (repeatable).")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    with handle_errors(debug):
        if fmt.lower() not in ("yaml", "json"):
            raise ConfigError(f"--format {fmt!r}; valid: yaml, json")
        if out is not None:  # a file, or a parent that is a file or unwritable, fails now, not after the searches
            check_writable(out, "--out", directory=True)
        adamw = adamw_reference(adam_lr, adam_betas, adam_weight_decay)
        settings = PlanSettings(optimizers=optimizer, batch_size=batch_size, trials=trials, steps=steps, seeds=seeds,
                                rank_by=rank_by, storage=storage, study_prefix=study_name, workers=workers,
                                timeout=timeout, device=device, gpu=gpu, reserve_gb=reserve_gb, world_size=world_size,
                                sharding=sharding.value, bucket_view=bucket_view, param_dtype=param_dtype,
                                state_dtype=state_dtype, adamw=adamw, seed=seed, fixed=tuple(set_ or ()),
                                enqueue=tuple(enqueue or ()))
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # a trial failed by Ctrl-C: no traceback
        mf = load_model_file(model)
        with progress(enabled=stderr.is_terminal) as update:
            result = plan(mf, settings, progress=update,
                          log=lambda m: stderr.print(m, highlight=False, markup=False, soft_wrap=True))
        result.command = "precondtune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
        target = out or Path("reports") / f"{mf.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        files = write_outputs(result, target, fmt.lower())
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
            "timing_warning": result.timing_warning,
            "dtype_note": result.dtype_note,
        }
        if json_:
            emit_json(doc)
        else:
            rows = sorted(result.candidates, key=lambda c: (c.median is None, c.median or 0.0))
            stdout.print(table(f"plan for {mf.path}", ["optimizer", "eval loss (median)", "spread", "steps",
                                                       "peak memory", "status"],
                               [[c.name + (" ★" if c.name == result.winner else ""),
                                 "-" if c.median is None else f"{c.median:.4f}",
                                 f"{c.spread:.4f}" if len(c.rank_losses) > 1 else "-", c.rank_steps or "-",
                                 human_bytes(c.memory["bytes"]["total_peak"]), c.status] for c in rows]))
            if result.timing_warning:
                stdout.print(f"warning: {result.timing_warning}", highlight=False, markup=False, soft_wrap=True)
            if result.dtype_note:
                stdout.print(f"note: {result.dtype_note}", highlight=False, markup=False, soft_wrap=True)
            if result.winner:
                stdout.print(f"recommended: [bold]{result.winner}[/bold] — {escape(result.reason)}", highlight=False)
            else:
                stdout.print(f"no recommendation: {result.reason}", highlight=False, markup=False)
            stdout.print(f"wrote {target}/ ({', '.join(p.name for p in files.values())})", highlight=False)
        if not any(c.fits for c in result.candidates) or (result.winner is None and not result.meta):
            raise typer.Exit(1)
