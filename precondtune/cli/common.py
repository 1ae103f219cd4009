"""What every command shares: option types, error handling, JSON/table output and progress on stderr.

Commands stay thin (STYLE.md): parse options, call one library function, render. Errors a user can fix are
:class:`PrecondtuneError`s, printed as one line on stderr with a non-zero exit; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import cannot_create_in
from ..errors import ConfigError, PrecondtuneError
from ..stopping import Terminated
from ..units import human_bytes, human_count  # noqa: F401 - re-exported for the commands

LOG_WIDTH = 200
"""Columns for tables written where no terminal is attached (a job log, ``nohup``, CI): there is no width to
fit, and rich's fallback of 80 cut values (``10.3…``). ``COLUMNS`` still wins, and a pipe from a terminal
(``| tee``) keeps the terminal's width."""


def _on_a_terminal() -> bool:
    for fd in (0, 1, 2):
        try:
            os.get_terminal_size(fd)
            return True
        except OSError:
            pass
    return False


class _Stdout(Console):
    def _size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        if self._width is None and "COLUMNS" not in os.environ and not self.is_terminal and not _on_a_terminal():
            return ConsoleDimensions(LOG_WIDTH, size.height)
        return size

    size = property(_size, Console.size.fset)  # type: ignore[assignment]


stdout = _Stdout()
stderr = Console(stderr=True)


class Sharding(str, Enum):
    none = "none"
    zero1 = "zero1"
    zero2 = "zero2"
    fsdp = "fsdp"


class ConfigFormat(str, Enum):
    """How a written config file is serialised (``--format``; by default from the output file's suffix)."""

    yaml = "yaml"
    json = "json"


ModelArg = Annotated[str, typer.Argument(help="Model file (path/to/model.py or path/to/model.py:factory).",
                                         show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (for scripts).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
GpuOpt = Annotated[str | None, typer.Option("--gpu", help="Plan for this GPU profile (see `precondtune gpus`).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size passed to sample_batch.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", "-o", help="NAME[,NAME...] or all.")]
StateDtypeOpt = Annotated[str | None, typer.Option("--state-dtype", help="Optimizer state dtype (default: param dtype).")]
WorldSizeOpt = Annotated[int, typer.Option("--world-size", help="GPUs sharing the job.")]
ShardingOpt = Annotated[Sharding, typer.Option("--sharding", help="none, zero1, zero2 or fsdp.")]


@contextmanager
def handle_errors(debug: bool) -> Iterator[None]:
    """Turn user-fixable errors into one stderr line and an exit code; anything else into a short message."""
    try:
        yield
    except typer.Exit:
        raise
    except PrecondtuneError as e:
        if debug:
            raise
        stderr.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        stderr.print("terminated" if terminated else "interrupted", highlight=False)
        raise typer.Exit(143 if terminated else 130) from None
    except Exception as e:
        if debug:
            raise
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        stderr.print(f"[red]error:[/red] {escape(msg)} (rerun with --debug for the traceback)", highlight=False,
                     soft_wrap=True)
        raise typer.Exit(1) from None


def check_writable(path: str | os.PathLike[str], option: str, *, directory: bool = False) -> None:
    """Fail before any work when ``path`` (a file, or with ``directory`` a directory) cannot be written later:
    empty, the wrong kind, or under a file or an unwritable directory (missing directories are made on write)."""
    target = Path(path)
    if not str(path).strip():
        raise ConfigError(f"{option} is empty; give a {'directory' if directory else 'file name such as trials.csv'}")
    if target.exists() and target.is_dir() != directory:
        raise ConfigError(f"{option} {path} is {'a file' if directory else 'a directory'}; give a "
                          f"{'directory (it is created if missing)' if directory else 'file name inside it'}")
    blocker = next(a for a in target.absolute().parents if a.exists())
    if not blocker.is_dir():
        raise ConfigError(f"{option} {path}: {blocker} is a file, not a directory; give a path in a writable directory")
    why = cannot_create_in(blocker)
    if why is not None:
        raise ConfigError(f"{option} {path}: cannot create a file in {blocker} ({why}); give a path in a writable "
                          "directory")


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        return _plain(v.item())
    return v


JSON_OUT: Any = None
"""Where :func:`emit_json` writes: the process's stdout, set by ``cli.main`` before it sends everything else
printed under ``--json`` (a model file's prints) to stderr; ``None``: ``sys.stdout`` (e.g. typer's test runner)."""


def emit_json(doc: dict[str, Any]) -> None:
    """The one JSON document on stdout (non-finite floats become null)."""
    out = JSON_OUT or sys.stdout
    out.write(json.dumps(_plain(doc), indent=2) + "\n")
    out.flush()


def table(title: str, columns: list[str], rows: list[list[Any]], *, caption: str | None = None) -> Table:
    t = Table(title=title, caption=caption, title_justify="left")
    for k, c in enumerate(columns):
        if k == 0:  # names (optimizers, GPU profiles) are typed back as options: never cut, other columns wrap
            t.add_column(c, justify="left", no_wrap=True, min_width=max((len(str(r[0])) for r in rows), default=0))
        else:
            t.add_column(c, justify="right", overflow="fold")  # a long token (a URL) folds, never "…"
    for r in rows:
        t.add_row(*(str(x) for x in r))
    return t


@contextmanager
def progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar on stderr; yields ``update(description, done, total)``."""
    if not enabled:
        yield lambda desc, done, total: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=stderr, transient=True, disable=not stderr.is_terminal)  # piped: no stray blank line
    tasks: dict[str, Any] = {}
    with bar:
        def update(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)
        yield update


TokensPerBatchOpt = Annotated[int | None, typer.Option(
    "--tokens-per-batch", help="Tokens per optimizer step to cost for (default: the tokens in --batch-size "
                               "sequences); FLOPs scale linearly from the counted batch.")]
MfuOpt = Annotated[float, typer.Option("--mfu", help="Assumed matmul FLOP utilisation for --gpu predictions, "
                                                     "a fraction in (0, 1].")]
MbuOpt = Annotated[float, typer.Option("--mbu", help="Assumed memory-bandwidth utilisation of elementwise work "
                                                     "for --gpu predictions, a fraction in (0, 1].")]

# Search options (`tune`, `plan`; SPEC.md "Search options").
TrialsOpt = Annotated[int, typer.Option("--trials", min=0, help="New trials to run (added to the study's count).")]
TrialStepsOpt = Annotated[int, typer.Option("--steps", min=1, help="Training steps per trial (the full schedule).")]
StorageOpt = Annotated[str | None, typer.Option(
    "--storage", help="Optuna storage: sqlite:///file.db (default ./precondtune-studies.db), postgresql://..., "
                      "journal:///path.log (file journal, NFS-safe) or memory.")]
StudyNameOpt = Annotated[str | None, typer.Option("--study-name", help="Study to create or resume "
                                                                       "(default MODEL-OPTIMIZER).")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, help="Local processes running trials of one study.")]
TimeoutOpt = Annotated[float | None, typer.Option("--timeout", min=0, help="Stop starting trials after SECONDS.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE: fix a knob (repeatable); a list "
                                                                  "in brackets: betas=[0.9,0.99].")]
EnqueueOpt = Annotated[list[str] | None, typer.Option("--enqueue", help="KEY=VALUE[,KEY=VALUE...]: a warm-start "
                                                                        "trial (repeatable); lists in brackets.")]
SeedsOpt = Annotated[int, typer.Option("--seeds", min=1, help="Re-run the top configs on K seeds; pick by median.")]
AdamLrOpt = Annotated[float | None, typer.Option("--adam-lr", min=0, help="Tuned AdamW lr to transfer from.")]
AdamBetasOpt = Annotated[str | None, typer.Option("--adam-betas", help="Tuned AdamW betas, e.g. 0.9,0.95.")]
AdamWdOpt = Annotated[float | None, typer.Option("--adam-weight-decay", min=0, help="Tuned AdamW weight decay.")]
SamplerOpt = Annotated[str, typer.Option("--sampler", help="tpe, gp, cmaes (pip install 'precondtune[samplers]') "
                                                           "or random.")]
PrunerOpt = Annotated[str, typer.Option("--pruner", help="median, halving (successive halving) or none.")]
WarmupOpt = Annotated[int | None, typer.Option("--warmup", min=0, help="Warmup steps (default 10% of --steps).")]
DecayOpt = Annotated[str, typer.Option("--decay", help="lr decay after warmup: cosine, linear or constant.")]

# memory (precondtune memory): precision, checkpointing, fit
GradDtypeOpt = Annotated[str | None, typer.Option("--grad-dtype", help="Gradient dtype (default: param dtype).")]
MasterWeightsOpt = Annotated[bool, typer.Option("--master-weights",
                                                help="fp32 master copy of 16-bit params (the optimizer updates it).")]
AutocastOpt = Annotated[str | None, typer.Option("--autocast", help="Forward under torch.autocast: bf16 or fp16.")]
BucketViewOpt = Annotated[bool, typer.Option(
    "--bucket-view", help="DDP (--world-size > 1, no sharding) with gradient_as_bucket_view=True: no second copy of "
                          "the gradients in its all-reduce buckets.")]
CheckpointBlocksOpt = Annotated[bool, typer.Option("--checkpoint-blocks",
                                                   help="Activation-checkpoint the model's repeated blocks.")]
ReserveGbOpt = Annotated[float, typer.Option("--reserve-gb", help="GiB kept back for the CUDA context, workspaces "
                                                                  "and allocator fragmentation.")]
MaxBatchOpt = Annotated[bool, typer.Option("--max-batch-size", help="Also find the largest batch size that fits.")]
