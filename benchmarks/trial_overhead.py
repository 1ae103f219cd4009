"""Trial overhead of `precondtune tune` and steps saved by pruning, on the bundled examples.

Trial overhead = the share of a trial's wall time spent outside its training steps (model copy, optimizer
build, final evaluation, Optuna's storage writes for intermediate reports). Study overhead also counts the time
between trials (sampling, enqueueing, storage reads). Target (issue 7): below 5% of a trial.

    python benchmarks/trial_overhead.py [--examples mlp,chargpt,cnn] [--trials 10] [--steps 200]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch

from precondtune.modelfile import load_model_file
from precondtune.search import SearchSettings, run_search

ROOT = Path(__file__).resolve().parent.parent


def measure(example: str, trials: int, steps: int, storage: str) -> str:
    """One markdown table row for ``example``."""
    mf = load_model_file(ROOT / "examples" / f"{example}.py")
    settings = SearchSettings(optimizer="adamw", trials=trials, steps=steps, batch_size=8, storage=storage,
                              study_name=f"bench-{example}-{time.time_ns()}", pruner="median")
    started: dict[str, float] = {}
    r = run_search(mf, settings, on_study=lambda name, url: started.setdefault("t", time.perf_counter()))
    wall = time.perf_counter() - started["t"]
    f = r.frame.dropna(subset=["trial_seconds", "train_seconds"])
    per_trial = [1 - a / b for a, b in zip(f["train_seconds"], f["trial_seconds"]) if b > 0]
    done = len(f)
    return (f"| {example} | {done} ({r.new['pruned']} pruned) | {steps} | {100 * statistics.median(per_trial):.2f}% | "
            f"{100 * (1 - f['train_seconds'].sum() / wall):.2f}% | {r.steps_saved_by_pruning} of {done * steps} "
            f"({100 * r.steps_saved_by_pruning / max(done * steps, 1):.0f}%) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", default="mlp,chargpt,cnn")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--storage", default=None, help="Optuna storage URL (default: a temporary SQLite file)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage or f"sqlite:///{tmp}/bench.db"
        print(f"storage: {'temporary SQLite file' if args.storage is None else storage}")
        print("| example | trials | steps | trial overhead (median) | study overhead | steps saved by pruning |")
        print("| --- | --- | --- | --- | --- | --- |")
        for example in args.examples.split(","):
            print(measure(example, args.trials, args.steps, storage), flush=True)


if __name__ == "__main__":
    main()
