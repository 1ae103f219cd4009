"""The recommendation of `precondtune plan` against AdamW tuned with the same budget, on the examples.

Runs `precondtune plan EXAMPLE --json` for each example (or reads saved `--json` outputs with --from-json) and
prints one markdown table: per example, the recommended optimizer and the tuned AdamW baseline side by side, with
their median eval loss over the ranking seeds, the seed spread, the steps each ran in the equal-time budget, the
measured step time and the wall-clock of the ranking run, plus the runner-up.

    python benchmarks/plan_vs_adamw.py                         # chargpt, mlp, cnn with plan's defaults
    python benchmarks/plan_vs_adamw.py --from-json a.json b.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(example: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "precondtune", "plan", f"examples/{example}.py", "--json",
                            "--out", f"{tmp}/out", "--storage", f"sqlite:///{tmp}/s.db", *extra],
                           cwd=ROOT, capture_output=True, text=True)
        if r.returncode not in (0, 1):
            raise SystemExit(f"plan {example} failed: {r.stderr.strip()[-300:]}")
        doc = json.loads(r.stdout)
        doc["wall_seconds"] = time.perf_counter() - t0
        return doc


def row(doc: dict) -> list[str]:
    opts = {o["name"]: o for o in doc["optimizers"]}
    ranked = sorted((o for o in doc["optimizers"] if o["median_eval_loss"] is not None),
                    key=lambda o: o["median_eval_loss"])
    winner, adamw = opts.get(doc["winner"]), opts.get("adamw")
    best_other = next((o for o in ranked if o["name"] != "adamw"), None)

    def cell(o: dict | None) -> str:
        if o is None or o["median_eval_loss"] is None:
            return "-"
        spread = max(o["seed_losses"]) - min(o["seed_losses"])
        seconds = o["rank_steps"] * o["step_seconds"] if o["step_seconds"] else float("nan")
        return (f"{o['name']}: {o['median_eval_loss']:.4f}, spread {spread:.4f} "
                f"({o['rank_steps']} steps × {1e3 * o['step_seconds']:.1f} ms = {seconds:.2f} s)")

    return [Path(doc["model"]["path"]).stem, doc["winner"] or "-", cell(winner), cell(adamw),
            cell(best_other), f"{doc.get('wall_seconds', doc.get('seconds', 0)):.0f} s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", default="chargpt,mlp,cnn")
    ap.add_argument("--from-json", nargs="*", default=None, help="saved `plan --json` outputs instead of running")
    ap.add_argument("extra", nargs="*", help="extra plan options after --, e.g. -- --trials 8")
    args = ap.parse_args()
    if args.from_json:
        docs = [json.loads(Path(p).read_text()) for p in args.from_json]
    else:
        docs = [run(e, args.extra) for e in args.examples.split(",")]
    print("| example | recommended | recommended: median eval loss over seeds, spread (max−min), budget | tuned AdamW | "
          "best non-AdamW | plan wall time |")
    print("|---|---|---|---|---|---|")
    for d in docs:
        print("| " + " | ".join(row(d)) + " |")


if __name__ == "__main__":
    main()
