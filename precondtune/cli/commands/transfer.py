from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ...errors import ConfigError
from ...inventory import count_parameters, inventory
from ...modelfile import load_model_file
from ...transfer import Transferred, transfer, with_traced_estimates, write_configs
from ..common import (
    BatchOpt,
    ConfigFormat,
    DebugOpt,
    JsonOpt,
    ModelArg,
    emit_json,
    handle_errors,
    human_bytes,
    stdout,
    table,
)

NAME = "transfer"
HELP = ("Hyperparameters transferred from a tuned AdamW (or a Muon lr in another convention) to other optimizers; "
        "writes the recommended config.")


def _number(option: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a number; e.g. {option} 3e-4") from None


def _betas(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 2:
        raise ConfigError(f"--betas {text!r}: give two numbers b1,b2, e.g. --betas 0.9,0.95")
    return values  # type: ignore[return-value]


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return str(x)


def _render(results: list[Transferred]) -> None:
    if len(results) > 1:
        rows = [[t.optimizer, _fmt(t.config.hyperparameters.get("lr", "-")),
                 "; ".join(f"{g['match']} -> {g['optimizer']}" for g in t.config.param_groups) or "-",
                 human_bytes(t.config.estimates.get("optimizer_state_bytes")), t.rule, t.source] for t in results]
        stdout.print(table("transferred configs", ["optimizer", "lr", "routing", "state", "rule", "source"], rows))
        return
    t = results[0]
    stdout.print(table(f"{t.optimizer}: hyperparameters", ["hyperparameter", "value"],
                       [[k, _fmt(v)] for k, v in t.config.hyperparameters.items()],
                       caption=f"rule: {t.rule}\nsource: {t.source}"))
    if t.groups:
        stdout.print(table("routing on this model (first match wins)", ["role", "optimizer", "lr", "tensors",
                                                                         "elements"],
                           [[g["role"], g["optimizer"], _fmt(g["lr"]), g["tensors"], f"{g['numel']:,}"]
                            for g in t.groups]))
    if t.shapes:
        stdout.print(table("Muon lr per matrix shape (lr·s and lr·wd unchanged)",
                           ["shape", "tensors", "s from", "s to", "lr", "weight decay"],
                           [["×".join(map(str, s.shape)), len(s.names), _fmt(s.scale_from), _fmt(s.scale_to),
                             _fmt(s.lr), _fmt(s.weight_decay)] for s in t.shapes]))


def command(
    model: ModelArg,
    lr: Annotated[str | None, typer.Option("--lr", help="The tuned learning rate (required).",
                                           show_default=False)] = None,
    from_: Annotated[str, typer.Option("--from", help="adamw, or muon (convert between Muon lr conventions).")]
    = "adamw",
    betas: Annotated[str | None, typer.Option("--betas", help="AdamW's b1,b2 (default 0.9,0.999).")] = None,
    eps: Annotated[str | None, typer.Option("--eps", help="AdamW's eps (default 1e-8).")] = None,
    weight_decay: Annotated[str | None, typer.Option("--weight-decay", help="Decoupled weight decay.")] = None,
    to: Annotated[str, typer.Option("--to", help="NAME[,NAME...] or all.")] = "all",
    convention: Annotated[list[str] | None, typer.Option(
        "--convention", help="Muon lr convention (keller, moonlight, spectral). With --from muon give it twice: "
                             "the tuned lr's, then the target's; with --from adamw once: the target's.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the config here (default recommended.yaml; with "
                                                          "several optimizers a directory, default recommended/, "
                                                          "one <name>.yaml each).")] = None,
    format_: Annotated[ConfigFormat | None, typer.Option("--format", help="yaml or json (default: by --out's suffix, "
                                                                     "else yaml).")] = None,
    batch_size: BatchOpt = 8,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    with handle_errors(debug):
        if lr is None:
            raise ConfigError("--lr is required: the tuned learning rate, e.g. --lr 3e-4")
        conventions = list(convention or [])
        if len(conventions) > 2:
            raise ConfigError("--convention is given at most twice (source, then target)")
        mf = load_model_file(model)
        net = mf.build()
        results = transfer(
            inventory(net), to, lr=_number("--lr", lr), betas=_betas(betas),
            eps=None if eps is None else _number("--eps", eps),
            weight_decay=None if weight_decay is None else _number("--weight-decay", weight_decay), source=from_,
            convention=conventions[0] if conventions else None,
            target_convention=conventions[1] if len(conventions) > 1 else None)
        notes: list[str] = []
        results = with_traced_estimates(results, mf, batch_size=batch_size, notes=notes)
        if out is None:
            out = Path("recommended" if len(results) > 1 else
                       f"recommended.{format_.value if format_ else 'yaml'}")
        written = write_configs(results, out, format_.value if format_ else None)
        if json_:
            total, trainable = count_parameters(net)
            emit_json({"model": {"path": str(mf.path), "parameters": total, "trainable_parameters": trainable},
                       "from": results[0].config.evidence.get("transferred_from", {}),
                       "optimizers": [t.as_json() for t in results], "written": [str(p) for p in written],
                       "notes": notes})
            return
        _render(results)
        for n in notes:
            stdout.print(f"note: {n}", highlight=False, soft_wrap=True, markup=False)
        for p in written:
            stdout.print(f"wrote {p}", highlight=False)
