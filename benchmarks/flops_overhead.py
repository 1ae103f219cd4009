"""Measured time overhead per optimizer next to the predicted (FLOP) overhead, on the runnable examples.

    python benchmarks/flops_overhead.py [--examples chargpt,mlp,cnn] [--steps 20] [--device cpu] [--gpu h100]

For each example and optimizer: F (forward+backward FLOPs), the analytic amortized optimizer FLOPs and their
overhead A/F (the prediction if the optimizer's work ran at the same rate as forward+backward), the measured
median step time, the refresh step's own time and the measured amortized time overhead against AdamW
(:func:`precondtune.flops.flops_report` with ``measure=True``), and, with ``--gpu``, the time overhead predicted
on that profile. Prints a Markdown table per example (docs/flops.md records one run) and the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from precondtune.flops import FlopsReport, flops_report
from precondtune.modelfile import load_model_file

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {cores} cores usable, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"load average {load:.1f} at start{gpu}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def markdown(r: FlopsReport) -> str:
    gpu = r.gpu is not None
    head = ["optimizer", "every", "FLOP overhead (predicted)", "median step", "refresh step",
            "measured time overhead"] + ([f"predicted time overhead ({r.gpu.name})"] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in sorted(r.optimizers, key=lambda o: o.overhead):
        m = o.measured
        refresh = "-"
        if m and m.refresh_step_seconds is not None:
            refresh = f"{m.refresh_step_seconds * 1e3:.1f} ms (step {m.refresh_step})"
        row = [o.name, str(o.refresh_every or "-"), f"{o.overhead:.2%}",
               f"{m.step_seconds * 1e3:.1f} ms" if m else (o.measure_note or "-"), refresh,
               _pct(o.measured_time_overhead)] + ([_pct(o.predicted_time_overhead)] if gpu else [])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", default="chargpt,mlp,cnn")
    ap.add_argument("--optimizers", default="all")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu", default=None, help="also predict on this GPU profile")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 avoids OpenMP spin-wait stalls on a shared, oversubscribed machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}\n")
    for name in args.examples.split(","):
        mf = load_model_file(ROOT / "examples" / f"{name}.py")
        r = flops_report(mf, args.optimizers, batch_size=args.batch_size, measure=True, steps=args.steps,
                         warmup=args.warmup, device=args.device, gpu=args.gpu)
        print(f"### {name}: F = {r.train_flops_per_step / 1e6:.1f} MFLOP per step "
              f"({r.tokens_per_batch} tokens, batch {r.batch_size}), {r.trainable_parameters:,} parameters, "
              f"device {r.device}\n")
        print(markdown(r) + "\n", flush=True)


if __name__ == "__main__":
    main()
