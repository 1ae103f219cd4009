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
    app()
