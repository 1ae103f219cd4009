"""When may the median pruner start? Replays unpruned studies under Optuna's MedianPruner with several starts.

For each EXAMPLE:OPTIMIZER pair, `precondtune tune`'s trial (same data, seed, schedule and reports as the CLI) runs
``--trials`` random configurations from the optimizer's search space with ``--pruner none``, so every trial's 9
intermediate values (mean training loss of each 20-step window at the default 200 steps) and its final eval loss
are known. Each study is then replayed offline in ``--orders`` random trial orders under ``MedianPruner`` semantics
(after 3 completed trials, a trial whose best intermediate value so far is above the median of the completed
trials' values at that step is pruned there) for each start step, and the script prints, per start:

- steps saved by pruning, as a share of all steps;
- P(best pruned): how often the configuration with the lowest final eval loss was pruned;
- regret: final eval loss of the best surviving trial minus the best of all, in units of the interquartile range
  of the final losses (0 = the search still finds its best configuration).

    python benchmarks/pruning_start.py [--pairs chargpt:adamw,cnn:adamw] [--trials 30] [--starts 20,40,60,80,100]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch

from precondtune.modelfile import load_model_file
from precondtune.search import SearchSettings, run_search

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ("chargpt:adamw,chargpt:muon,chargpt:soap,chargpt:adafactor,mlp:adamw,mlp:muon,mlp:soap,"
         "cnn:adamw,cnn:muon,cnn:soap")


def trajectories(example: str, optimizer: str, trials: int, steps: int, storage: str) -> list[tuple[dict, float]]:
    """(intermediate values by step, final eval loss) of each complete trial of an unpruned random search."""
    mf = load_model_file(ROOT / "examples" / f"{example}.py")
    name = f"{example}-{optimizer}-{time.time_ns()}"
    settings = SearchSettings(optimizer=optimizer, trials=trials, steps=steps, storage=storage, study_name=name,
                              pruner="none", sampler="random")
    run_search(mf, settings, progress=lambda *_: None)
    study = optuna.load_study(study_name=name, storage=storage)
    # every window's mean, from the trial's result (the storage's intermediate values start where the pruner judges)
    return [({int(k): v for k, v in t.user_attrs["result"]["reports"].items() if int(k) < steps}, float(t.value))
            for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def replay(trials: list[tuple[dict, float]], start: int, order: list[int], steps: int) -> tuple[int, list[int]]:
    """Steps run and the completed trials when ``order``'s trials meet a median pruner that starts at ``start``."""
    completed: list[int] = []
    run = 0
    for i in order:
        inter = trials[i][0]
        stop = None
        for step in sorted(inter):
            if step < start or len(completed) < 3:
                continue
            best = min(v for s, v in inter.items() if s <= step)
            others = [trials[j][0][step] for j in completed if step in trials[j][0]]
            if others and best > statistics.median(others):
                stop = step
                break
        run += steps if stop is None else stop
        if stop is None:
            completed.append(i)
    return run, completed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default=PAIRS)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--starts", default="20,40,60,80,100")
    ap.add_argument("--orders", type=int, default=300)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.trials} random "
          f"trials per pair, {args.steps} steps, {args.orders} trial orders")
    starts = [int(s) for s in args.starts.split(",")]
    pairs = args.pairs.split(",")
    rows = {s: [] for s in starts}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in pairs:
            example, optimizer = pair.split(":")
            trials = trajectories(example, optimizer, args.trials, args.steps, f"sqlite:///{tmp}/prune.db")
            finals = [f for _, f in trials]
            best = min(range(len(trials)), key=finals.__getitem__)
            q = statistics.quantiles(finals, n=4)
            spread = (q[2] - q[0]) or 1.0
            for start in starts:
                saved = lost = regret = 0.0
                for r in range(args.orders):
                    order = list(range(len(trials)))
                    random.Random(r).shuffle(order)
                    run, completed = replay(trials, start, order, args.steps)
                    saved += 1 - run / (args.steps * len(trials))
                    lost += best not in completed
                    regret += (min(finals[i] for i in completed) - finals[best]) / spread
                n = args.orders
                rows[start].append(f"{100 * saved / n:.0f}% / {lost / n:.2f} / {regret / n:.3f}")
            print(f"collected {pair}: {len(trials)} complete trials", flush=True)
    print("\nsteps saved / P(best pruned) / regret (in final-loss IQRs), by the step the pruner may start at\n")
    print("| start | " + " | ".join(pairs) + " |")
    print("| --- |" + " --- |" * len(pairs))
    for start in starts:
        print(f"| {start} | " + " | ".join(rows[start]) + " |")


if __name__ == "__main__":
    main()
