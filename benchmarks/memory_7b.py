"""Benchmark: `precondtune memory examples/llama7b_meta.py --optimizer all` — wall time, CPU time and peak RSS.

Run: python benchmarks/memory_7b.py [--batch-size 8]. Target (docs/memory.md): < 10 s and < 1.5 GB RSS on 2 cores.
The command runs in a child process so its peak RSS is measured alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    cmd = ["precondtune", "memory", str(ROOT / "examples" / "llama7b_meta.py"), "--optimizer", "all",
           "--batch-size", str(args.batch_size), "--json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"memory failed: {r.stderr.strip()}")
    doc = json.loads(r.stdout)
    print(json.dumps({
        "wall_seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(), "optimizers": [o["name"] for o in doc["optimizers"]],
        "total_peak_gib": {o["name"]: round(o["bytes"]["total_peak"] / 2**30, 2) for o in doc["optimizers"]},
    }, indent=2))


if __name__ == "__main__":
    main()
