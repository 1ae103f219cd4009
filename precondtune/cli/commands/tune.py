"""``precondtune tune MODEL --optimizer NAME``: one Optuna study (library: :func:`precondtune.search.run_search`)."""
from __future__ import annotations

import json
from typing import Annotated

import optuna
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ...config import write_text_atomic
from ...modelfile import load_model_file
from ...search import TOP_FOR_SEEDS, SearchResult, SearchSettings, adamw_reference, is_memory_url, run_search
from ..common import (
    AdamBetasOpt,
    AdamLrOpt,
    AdamWdOpt,
    BatchOpt,
    DebugOpt,
    DecayOpt,
    DeviceOpt,
    EnqueueOpt,
    JsonOpt,
    ModelArg,
    PrunerOpt,
    SamplerOpt,
    SeedOpt,
    SeedsOpt,
    SetOpt,
    StorageOpt,
    StudyNameOpt,
    TimeoutOpt,
    TrialsOpt,
    TrialStepsOpt,
    WarmupOpt,
    WorkersOpt,
    check_writable,
    emit_json,
    handle_errors,
    stderr,
    stdout,
    table,
)

NAME = "tune"
HELP = "One Optuna search for one optimizer: short full-schedule trials, pruning, resumable storage."


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def _parse(v: object) -> object:
    if isinstance(v, str) and v.startswith("["):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _short(v: object) -> str:
    """A table cell: 3 significant digits (the best config below is printed in full); "-" for a missing value."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(x, (list, tuple)) for x in v):  # a per-step schedule: its length only
            return f"{len(v)} per-step"
        return "(" + ", ".join(_short(x) for x in v) + ")"
    return str(v)


def _render(r: SearchResult, top: int, timed_out: bool = False) -> None:
    frame = r.frame.head(top)
    # one column per knob that differs between the listed trials; the best config is printed in full below
    hp_cols = [k for k in (r.best_hyperparameters or {})
               if k in frame and frame[k].dropna().astype(str).nunique() > 1]  # failed trials have no values
    seeds = "seed_median" in frame and frame["seed_median"].notna().any()
    rows = []
    for _, t in frame.iterrows():
        value = "-" if t["value"] is None or t["value"] != t["value"] or t["state"] != "COMPLETE" \
            else f"{t['value']:.4f}"
        row = [t["number"], t["state"].lower(), value]
        if seeds:
            row.append(f"{t['seed_median']:.4g} [{t['seed_min']:.4g}, {t['seed_max']:.4g}]"
                       if t["seed_median"] == t["seed_median"] else "-")
        steps = t.get("steps_run")
        row += ["-" if steps is None or steps != steps else int(steps), *(_short(_parse(t[k])) for k in hp_cols),
                t["reason"] or t.get("enqueued", "") or ""]
        rows.append(row)
    c = r.counts
    columns = ["trial", "state", "eval loss", *(["seed median [min, max]"] if seeds else []), "steps", *hp_cols,
               "note"]
    stdout.print(table(f"study {r.study} ({r.optimizer} on {r.model}): {c['complete']} complete, "
                       f"{c['pruned']} pruned, {c['failed']} failed", columns, rows,
                       caption=f"storage {r.storage}; pruning saved {r.steps_saved_by_pruning} of "
                               f"{r.steps * (c['pruned'] + c['complete'])} steps"))
    if r.best_value is not None:
        what = f"seed median eval loss {r.best_value:.4f}" if r.seed_runs else f"eval loss {r.best_value:.4f}"
        stdout.print(f"best: trial {r.best_trial}, {what}: "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in (r.best_hyperparameters or {}).items()),
                     highlight=False, soft_wrap=True, markup=False)
    _notes(r, timed_out)


def _notes(r: SearchResult, timed_out: bool) -> None:
    """On stderr, with or without --json: why no trial completed (exit 1), and warm starts left in the queue."""
    c = r.counts
    if r.best_value is None:
        why = "; --timeout ended the run" if timed_out else ""
        stderr.print(f"no trial completed{why}{'; first failure: ' + r.first_failure if r.first_failure else ''}",
                     highlight=False, markup=False, soft_wrap=True)
    if c.get("waiting"):
        why = "--timeout ended the run first" if timed_out else "--trials was smaller than the queue"
        if is_memory_url(r.storage):
            note = (f"{c['waiting']} queued trial(s) (warm starts) did not run: {why}; an in-memory study ends with "
                    f"this run, so raise --trials (the defaults and the AdamW transfer run first) or use a file storage")
        else:
            note = (f"{c['waiting']} queued trial(s) (warm starts) wait for the next run: {why}; rerun with the same "
                    "--study-name to run them")
        stderr.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)


def command(
    model: ModelArg,
    optimizer: Annotated[str, typer.Option("--optimizer", "-o", help="The optimizer to tune (one name).")] = "adamw",
    trials: TrialsOpt = 20,
    steps: TrialStepsOpt = 200,
    batch_size: BatchOpt = 8,
    storage: StorageOpt = None,
    study_name: StudyNameOpt = None,
    workers: WorkersOpt = 1,
    timeout: TimeoutOpt = None,
    set_: SetOpt = None,
    enqueue: EnqueueOpt = None,
    seeds: SeedsOpt = 1,
    adam_lr: AdamLrOpt = None,
    adam_betas: AdamBetasOpt = None,
    adam_weight_decay: AdamWdOpt = None,
    sampler: SamplerOpt = "tpe",
    pruner: PrunerOpt = "median",
    warmup: WarmupOpt = None,
    decay: DecayOpt = "cosine",
    csv: Annotated[str | None, typer.Option("--csv", help="Write every trial (pandas DataFrame) to this CSV.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Rows in the final table (and in --json's top).")] = 10,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    with handle_errors(debug):
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        settings = SearchSettings(
            optimizer=optimizer, trials=trials, steps=steps, batch_size=batch_size, storage=storage,
            study_name=study_name, workers=workers, timeout=timeout, fixed=tuple(set_ or ()),
            enqueue=tuple(enqueue or ()), seeds=seeds, adamw=adamw_reference(adam_lr, adam_betas, adam_weight_decay),
            sampler=sampler.lower(), pruner=pruner.lower(), warmup=warmup, decay=decay.lower(), device=device,
            seed=seed)
        if csv is not None:
            check_writable(csv, "--csv")
        mf = load_model_file(model)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=stderr, transient=True, disable=not stderr.is_terminal)
        task = bar.add_task(f"tune {optimizer}", total=trials)

        def on_study(name: str, url: str, options: str, note: str | None) -> None:
            again = " ".join(filter(None, [f"--study-name {name} --storage {url}", options]))
            hint = "" if is_memory_url(url) else f" (resume: {again})"
            stderr.print(f"study {name} in {url}{hint}", highlight=False, soft_wrap=True, markup=False)
            if note:
                stderr.print(f"note: {note}", highlight=False, soft_wrap=True, markup=False)

        def progress(done: int, total: int, best: float | None, pruned: int, failed: int) -> None:
            best_s = "-" if best is None else f"{best:.4f}"
            then = f"; re-running the best {TOP_FOR_SEEDS} on {seeds - 1} more seed(s)" \
                if seeds > 1 and done >= total else ""
            bar.update(task, completed=done, total=total,
                       description=f"tune {optimizer}: best {best_s}, pruned {pruned}, failed {failed}{then}")

        with bar:
            result = run_search(mf, settings, progress=progress, on_study=on_study)
        if csv:
            write_text_atomic(csv, result.frame.to_csv(index=False))
        timed_out = timeout is not None and sum(result.new.values()) < trials
        if json_:
            emit_json(result.as_json(top))
            _notes(result, timed_out)
        else:
            _render(result, top, timed_out=timed_out)
        if result.best_value is None and trials > 0:
            raise typer.Exit(1)
