from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ...config import write
from ...errors import ConfigError
from ...ns_coefficients import report
from ..common import ConfigFormat, DebugOpt, JsonOpt, emit_json, handle_errors, stdout, table

NAME = "ns-coefficients"
HELP = ("A per-step Newton–Schulz coefficient schedule for Muon (greedy minimax quintics) and its worst-case "
        "singular-value band.")


class NsDtype(str, Enum):
    bf16 = "bf16"
    fp32 = "fp32"


def _float(option: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a number") from None


def _int(option: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not an integer") from None


def _band(b: tuple[float, float] | list[float]) -> str:
    return f"[{b[0]:.4f}, {b[1]:.4f}]"


def command(
    steps: Annotated[str, typer.Option("--steps", help="Newton–Schulz steps T.")] = "5",
    lower: Annotated[str, typer.Option("--lower", help="Smallest normalised singular value σ/‖G‖_F to map "
                                                        "close to 1.")] = "1e-3",
    dtype: Annotated[NsDtype, typer.Option("--dtype", help="Dtype the iteration runs in (sets the headroom and "
                                                           "the random-matrix check).")] = NsDtype.bf16,
    headroom: Annotated[str | None, typer.Option("--headroom", help="Design each step for [ℓ, h·u] "
                                                                      "(default 1.01 bf16, 1.002 fp32).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write a Muon recommended config with this "
                                                          "schedule.")] = None,
    format_: Annotated[ConfigFormat | None, typer.Option("--format", help="yaml or json (default: by --out's "
                                                                     "suffix, else yaml).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random test matrices.")] = 0,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    with handle_errors(debug):
        rep = report(_int("--steps", steps), _float("--lower", lower), dtype=dtype.value,
                     headroom=None if headroom is None else _float("--headroom", headroom), seed=seed)
        written = write(rep.recommended_config(), out, format_.value if format_ else None) if out else None
        if json_:
            emit_json({**rep.as_json(), "written": str(written) if written else None})
            return
        s = rep.schedule
        stdout.print(table(escape(f"Newton–Schulz schedule: {s.steps} steps, σ ∈ [{s.lower:g}, 1], "
                                  f"headroom {s.headroom:g}"),
                           ["step", "a", "b", "c"],
                           [[k + 1, f"{a:.6f}", f"{b:.6f}", f"{c:.6f}"] for k, (a, b, c) in enumerate(s.coefficients)]))
        stdout.print(table("worst-case output singular values", ["schedule", "exact band", f"observed ({rep.dtype})"],
                           [["this schedule", _band(s.band), _band(rep.observed)],
                            ["public quintic (3.4445, −4.7750, 2.0315)", _band(rep.public_band),
                             _band(rep.public_observed)]],
                           caption=escape("exact: the composed polynomial over [lower, 1]; observed: Muon's kernel "
                                          "on random matrices with normalised singular values in [lower, 0.99]")))
        stdout.print("muon hyperparameters: ns_steps: " + str(s.steps) + ", ns_coefficients: "
                     + str([[round(x, 6) for x in c] for c in s.coefficients]), highlight=False, soft_wrap=True)
        for note in rep.notes:
            stdout.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        if written:
            stdout.print(f"wrote {written}", highlight=False)
