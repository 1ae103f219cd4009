"""The ``precondtune`` command line. Each command lives in ``cli/commands/<name>.py`` and defines ``NAME``,
``HELP`` and ``command``; this module finds them (so adding a command is adding its file)."""
from __future__ import annotations

import importlib
import pkgutil

import typer

from . import commands

ORDER = ("plan", "optimizers", "gpus", "profile", "memory", "flops", "tune", "transfer", "ns-coefficients")

app = typer.Typer(
    name="precondtune", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: install hints such as 'precondtune[samplers]' keep brackets
    help="Plan, cost and tune preconditioned optimizers (Muon, SOAP, Shampoo, Adam-mini, Sophia, ...) "
         "before a training run. Importing a model file runs its code, as `python model.py` would.",
)


def _register() -> None:
    found = []
    for info in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "command"):
            found.append(module)
    rank = {n: k for k, n in enumerate(ORDER)}
    for module in sorted(found, key=lambda m: (rank.get(m.NAME, len(rank)), m.NAME)):
        app.command(module.NAME, help=getattr(module, "HELP", None))(module.command)


_register()


def main() -> None:
    """Run the CLI; a bad option or argument is one line on stderr and exit code 2 (no usage panel)."""
    import sys

    try:  # typer >= 0.16 vendors click; older typers use click itself
        from typer._click import exceptions as click_exceptions
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exceptions

    from .. import stopping

    stopping.install()  # Ctrl-C and SIGTERM stop a search between steps, resumable
    usage_error = click_exceptions.UsageError
    abort = getattr(click_exceptions, "Abort", KeyboardInterrupt)
    exit_ = getattr(click_exceptions, "Exit", SystemExit)
    try:
        code = _run_app()
    except usage_error as e:
        message = e.format_message().strip()
        if not message:  # `precondtune` alone: the help was shown
            stopping.exit_process(0)
        hint = f" (see `precondtune {e.ctx.info_name} --help`)" if e.ctx is not None and e.ctx.parent else ""
        print(f"error: {message}{hint}", file=sys.stderr)
        stopping.exit_process(2)
    except abort as e:
        terminated = isinstance(e.__cause__, stopping.Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        stopping.exit_process(143 if terminated else 130)
    except exit_ as e:
        stopping.exit_process(getattr(e, "exit_code", getattr(e, "code", 0)))
    stopping.exit_process(code if isinstance(code, int) else 0)


def _run_app() -> object:
    """``app`` with, under ``--json``, stdout carrying the JSON document alone: whatever else is printed goes to
    stderr, Python's prints and writes to file descriptor 1 alike (a model file's ``os.system("echo …")``, a
    library's C code, worker processes, which inherit the descriptors)."""
    import os
    import sys
    from contextlib import redirect_stdout

    from . import common

    if "--json" not in sys.argv[1:]:
        return app(standalone_mode=False)  # returns typer.Exit's code instead of exiting
    if sys.stdout is not None:  # None when the command runs with stdout closed
        sys.stdout.flush()
    saved: int | None = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no descriptor 1 or 2 to move: Python-level redirection only
        if saved is not None:
            os.close(saved)
        saved = None
    common.JSON_OUT = sys.stdout if saved is None else os.fdopen(os.dup(saved), "w", encoding="utf-8")
    try:
        with redirect_stdout(sys.stderr):
            return app(standalone_mode=False)
    finally:
        if saved is not None:
            common.JSON_OUT.close()
            os.dup2(saved, 1)
            os.close(saved)
        common.JSON_OUT = None
