"""Zero-shot transfer from a tuned AdamW, measured: AdamW at its best lr of a small sweep vs every registered
optimizer at the transferred config (no search), same steps, batches and seeds; then a small lr sweep around
each transferred lr shows how far it sits from that optimizer's own best.

    python benchmarks/transfer.py                       # examples/mlp.py and examples/chargpt.py, all optimizers
    python benchmarks/transfer.py --examples mlp --optimizers muon,soap --steps 100

The sweep multiplies the optimizer's own learning rates (the main lr and any per-shape Muon rules) by each
factor and keeps the AdamW-routed roles at the tuned AdamW values. Output: a Markdown table on stdout and the
raw numbers as JSON (``--json-out``).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from precondtune import optim
from precondtune.config import as_tuples, routing
from precondtune.inventory import inventory
from precondtune.modelfile import load_model_file
from precondtune.training import Schedule, prepare, train
from precondtune.transfer import transfer

ROOT = Path(__file__).resolve().parent.parent

ADAMW_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
"""The AdamW sweep: a tuned AdamW is what users arrive with; this grid brackets both examples' optimum."""
FACTORS = (1 / 3, 1.0, 3.0)
"""Multipliers of the transferred lr in each optimizer's own sweep (×1 is the zero-shot run)."""
BETAS, WEIGHT_DECAY = (0.9, 0.95), 0.0


def run(data, name: str, hp: dict, rules: list, seeds: list[int], steps: int) -> float:
    """Mean eval loss over seeds (inf when any run diverged or failed)."""
    losses = []
    for seed in seeds:
        d = data[seed]
        try:
            r = train(d, name, {k: as_tuples(v) for k, v in hp.items()}, routing=rules, schedule=Schedule(steps))
        except Exception as e:  # noqa: BLE001 - a bundled optimizer failing is a result to report
            print(f"  {name}: {type(e).__name__}: {e}", file=sys.stderr)
            return math.inf
        if r.eval_loss is None or not math.isfinite(r.eval_loss):
            return math.inf
        losses.append(r.eval_loss)
    return statistics.fmean(losses)


def scaled(t, factor: float, main: str) -> tuple[dict, list]:
    """The transferred config with the optimizer's own lrs (not the AdamW fallback's) multiplied by ``factor``."""
    hp = dict(t.config.hyperparameters)
    if "lr" in hp:
        hp["lr"] = hp["lr"] * factor
    rules = routing(t.config)
    for r in rules:
        if r["optimizer"] == main and "lr" in r["hyperparameters"]:
            r["hyperparameters"] = {**r["hyperparameters"], "lr": r["hyperparameters"]["lr"] * factor}
    return hp, rules


def bench(example: str, names: list[str], steps: int, batch: int, seeds: list[int],
          factors: tuple[float, ...] = FACTORS) -> dict:
    mf = load_model_file(ROOT / "examples" / f"{example}.py")
    data = {s: prepare(mf, steps=steps, batch_size=batch, seed=s) for s in seeds}
    t0 = time.perf_counter()
    adamw = {lr: run(data, "adamw", {"lr": lr, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY}, [], seeds, steps)
             for lr in ADAMW_LRS}
    best_lr = min(adamw, key=lambda k: adamw[k])
    print(f"{example}: adamw sweep {adamw} -> lr {best_lr}", file=sys.stderr)
    rows = []
    for t in transfer(inventory(mf.build()), names, lr=best_lr, betas=BETAS, weight_decay=WEIGHT_DECAY):
        sweep = {f: run(data, t.optimizer, *scaled(t, f, t.optimizer), seeds, steps) for f in factors}
        best_f = min(sweep, key=lambda k: sweep[k])
        rows.append({"optimizer": t.optimizer, "transferred_lr": t.config.hyperparameters.get("lr"),
                     "transferred_eval_loss": sweep[1.0], "sweep": sweep, "best_factor": best_f,
                     "best_eval_loss": sweep[best_f], "rule": t.rule})
        print(f"  {t.optimizer}: {sweep}", file=sys.stderr)
    return {"example": example, "steps": steps, "batch_size": batch, "seeds": seeds, "adamw_sweep": adamw,
            "adamw_lr": best_lr, "adamw_eval_loss": adamw[best_lr], "optimizers": rows,
            "seconds": time.perf_counter() - t0}


def markdown(result: dict) -> str:
    a = result["adamw_eval_loss"]
    title = (f"### {result['example']} ({result['steps']} steps, batch {result['batch_size']}, "
             f"seeds {result['seeds']}): AdamW lr {result['adamw_lr']:g} → eval loss {a:.4f}")
    header = ("| optimizer | transferred lr | eval loss (zero-shot) | vs AdamW | best factor in sweep | "
              "eval loss at best |")
    out = [title, "", header, "|---|---|---|---|---|---|"]
    for r in result["optimizers"]:
        z, b = r["transferred_eval_loss"], r["best_eval_loss"]
        zs = "diverged" if not math.isfinite(z) else f"{z:.4f}"
        delta = "-" if not math.isfinite(z) else f"{z - a:+.4f}"
        lr = r["transferred_lr"]
        out.append(f"| {r['optimizer']} | {lr:g} | {zs} | {delta} | ×{r['best_factor']:.3g} | "
                   f"{'diverged' if not math.isfinite(b) else f'{b:.4f}'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", default="mlp,chargpt")
    ap.add_argument("--optimizers", default="all")
    ap.add_argument("--steps", type=int, default=0, help="default: 80 (mlp), 40 (chargpt)")
    ap.add_argument("--factors", default="0.3333,1,3", help="lr multipliers of each optimizer's sweep")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = [n for n in optim.resolve_names(args.optimizers) if n != "adamw"]
    default_steps = {"mlp": 80, "chargpt": 40}
    factors = tuple(float(f) for f in args.factors.split(","))
    if 1.0 not in factors:
        ap.error("--factors must include 1 (the zero-shot transferred lr)")
    results = []
    for ex in args.examples.split(","):
        steps = args.steps or default_steps.get(ex, 100)
        results.append(bench(ex, names, steps, args.batch_size, list(range(args.seeds)), factors))
        print(markdown(results[-1]) + "\n", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
