"""Trial overhead of `precondtune tune` and steps saved by pruning, on the bundled examples.

A trial runs from Optuna's ``datetime_start`` (the trial is created or popped from the queue) to its
``datetime_complete`` (told), so it includes sampling, every storage write, the model copy, the optimizer build
and the final evaluation. Trial overhead = the share of that time spent outside the trial's training steps.
Reported per trial (median over the study's trials, and in milliseconds) and over all trials together (total
overhead / total trial time); study overhead also counts the time between trials. Target (issue 7): below 5%.

    python benchmarks/trial_overhead.py [--examples mlp,chargpt,cnn] [--trials 10] [--steps 200] [--storage URL]
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

import precondtune.search as search
from precondtune.modelfile import load_model_file
from precondtune.search import SearchSettings, run_search

ROOT = Path(__file__).resolve().parent.parent


_OPENED: dict[str, search.StorageRef] = {}
_open = search.open_storage


def _storage(url: str | None, **kw: object) -> search.StorageRef:
    """One storage object per URL for the whole run, so an in-memory study can be read back after the search."""
    return _OPENED.setdefault(str(url), _open(url, **kw))  # type: ignore[arg-type]


search.open_storage = _storage


def measure(example: str, trials: int, steps: int, storage: str) -> str:
    """One markdown table row for ``example``."""
    mf = load_model_file(ROOT / "examples" / f"{example}.py")
    settings = SearchSettings(optimizer="adamw", trials=trials, steps=steps, batch_size=8, storage=storage,
                              study_name=f"bench-{example}-{time.time_ns()}", pruner="median")
    started: dict[str, float] = {}
    r = run_search(mf, settings, on_study=lambda *_: started.setdefault("t", time.perf_counter()),
                   progress=lambda *_: None)  # the CLI's progress callback reads the study after every trial
    wall = time.perf_counter() - started["t"]
    study = optuna.load_study(study_name=r.study, storage=_storage(storage).storage)
    windows, trains = [], []
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and t.datetime_start and t.datetime_complete:
            windows.append((t.datetime_complete - t.datetime_start).total_seconds())
            trains.append(float((t.user_attrs.get("result") or t.user_attrs).get("train_seconds") or 0.0))
    overhead = [w - tr for w, tr in zip(windows, trains)]
    share = [o / w for o, w in zip(overhead, windows) if w > 0]
    done = len(windows)
    return (f"| {example} | {done} ({r.new['pruned']} pruned) | {steps} | {1e3 * statistics.median(overhead):.0f} ms | "
            f"{100 * statistics.median(share):.1f}% | {100 * sum(overhead) / sum(windows):.1f}% | "
            f"{100 * (1 - sum(trains) / wall):.1f}% | {r.steps_saved_by_pruning} of {done * steps} "
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
        print("| example | trials | steps | overhead per trial (median) | trial overhead (median) | "
              "trial overhead (all trials) | study overhead | steps saved by pruning |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for example in args.examples.split(","):
            print(measure(example, args.trials, args.steps, storage), flush=True)


if __name__ == "__main__":
    main()
