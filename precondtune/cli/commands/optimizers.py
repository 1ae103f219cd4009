from __future__ import annotations

from ... import optim
from ..common import DebugOpt, JsonOpt, emit_json, handle_errors, stdout, table

NAME = "optimizers"
HELP = "The bundled optimizers: name, family, state formula, refresh knobs, paper."


def command(json_: JsonOpt = False, debug: DebugOpt = False) -> None:
    with handle_errors(debug):
        rows = [{"name": s.name, "family": s.family, "state_formula": s.state_formula,
                 "refresh_knobs": list(s.refresh_knobs), "roles": sorted(s.roles), "aliases": list(s.aliases),
                 "paper": s.paper} for s in optim.specs()]
        if json_:
            emit_json({"optimizers": rows})
            return
        stdout.print(table("bundled optimizers", ["name", "family", "state per parameter", "refresh knobs",
                                                  "handles roles", "paper"],
                           [[r["name"], r["family"], r["state_formula"], ", ".join(r["refresh_knobs"]) or "-",
                             ", ".join(r["roles"]), r["paper"]] for r in rows],
                           caption="n = parameter elements; roles a matrix-only optimizer does not handle go to "
                                   "AdamW unless a config routes them elsewhere"))
