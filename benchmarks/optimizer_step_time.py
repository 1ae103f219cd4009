"""Optimizer step time, side by side in one run: every bundled optimizer against its public reference.

    python benchmarks/optimizer_step_time.py                    # markdown table on stdout
    python benchmarks/optimizer_step_time.py --json             # one JSON document on stdout
    python benchmarks/optimizer_step_time.py --widths 256 512 --steps 10 --optimizers adamw muon

The model is a stack of ``--layers`` blocks ``Linear(d, e·d) → GELU → Linear(e·d, d) → LayerNorm`` (d = each
of ``--widths``, e = ``--expand``). Before every step an untimed forward/backward on a fixed batch fills the
gradients (optimizers that hook the forward, like Iso, need it); only ``optimizer.step()`` is timed. Ours, the
reference's and torch AdamW's steps are interleaved, so load from other processes falls on all of them alike;
the table gives medians over ``--steps`` steps after ``--warmup`` steps and, as a second opinion on a loaded
machine, the ratio of the fastest steps. Periodic refreshes (eigenbases, inverse roots, SVDs) run at the same
frequency in both implementations, so the median is the ordinary step; the amortized refresh cost is what
``precondtune flops`` reports.

Every optimizer in ``precondtune.optim.available()`` is timed; one that raises is skipped with its error.
References (test/bench-only dependencies): ``torch.optim`` AdamW (foreach), Muon, Adafactor; pytorch-optimizer
SOAP, Shampoo, AdamMini, AdaFactor, GaLore, SophiaH. A ratio is ours / reference: below 1 is faster.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import precondtune.optim as po

StepFn = Callable[[], Any]


class Stack(nn.Module):
    """``layers`` blocks of Linear(d, e·d) → GELU → Linear(e·d, d) → LayerNorm (a GPT MLP without attention)."""

    def __init__(self, width: int, layers: int, expand: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, expand * width), nn.GELU(), nn.Linear(expand * width, width),
                          nn.LayerNorm(width))
            for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return x


@dataclass(frozen=True)
class Reference:
    """A public implementation to time against: ``make(model, params, ours_config) -> step function``."""

    label: str
    make: Callable[[nn.Module, list[torch.Tensor], Any], StepFn]
    matrices_only: bool = False
    """Give both implementations only the 2-D weights (torch.optim.Muon accepts nothing else)."""


def _plain(opt: torch.optim.Optimizer) -> StepFn:
    return opt.step


def _pto(name: str) -> Any:
    import pytorch_optimizer  # bench-only dependency

    return getattr(pytorch_optimizer, name)


def _freq(config: Any, default: int = 10) -> int:
    return int(getattr(config, "precondition_frequency", default) or default)


def _sophia_h(model: nn.Module, params: list[torch.Tensor], config: Any) -> StepFn:
    opt = _pto("SophiaH")(params, update_period=int(getattr(config, "update_period", getattr(config, "k", 10))))
    hessian = [p.detach().abs() + 1e-3 for p in params]  # stands in for the estimate ours also gets separately
    period, count = opt.update_period, [0]

    def step() -> None:
        due = count[0] % period == 0
        count[0] += 1
        opt.step(hessian=hessian if due else None)
    return step


def _galore(model: nn.Module, params: list[torch.Tensor], config: Any) -> StepFn:
    mats = [p for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() != 2]
    group = {"params": mats, "rank": getattr(config, "rank", 128),
             "update_proj_gap": getattr(config, "update_proj_gap", 200), "scale": getattr(config, "scale", 0.25),
             "projection_type": "std"}
    return _plain(_pto("GaLore")([group, {"params": rest}]))


REFERENCES: dict[str, list[Reference]] = {
    "adamw": [Reference("torch.optim.AdamW(foreach)", lambda m, ps, c: _plain(torch.optim.AdamW(ps, foreach=True)))],
    "muon": [Reference("torch.optim.Muon", lambda m, ps, c: _plain(torch.optim.Muon(ps)), matrices_only=True)],
    "adafactor": [
        Reference("torch.optim.Adafactor", lambda m, ps, c: _plain(torch.optim.Adafactor(ps))),
        Reference("pytorch_optimizer.AdaFactor",
                  lambda m, ps, c: _plain(_pto("AdaFactor")(ps, betas=(None, 0.999)))),
    ],
    "adam-mini": [Reference("pytorch_optimizer.AdamMini", lambda m, ps, c: _plain(
        _pto("AdamMini")(m, lr=1e-3, num_embeds=m.blocks[0][0].in_features, num_heads=1)))],
    "soap": [Reference("pytorch_optimizer.SOAP",
                       lambda m, ps, c: _plain(_pto("SOAP")(ps, precondition_frequency=_freq(c))))],
    "shampoo": [Reference("pytorch_optimizer.Shampoo",
                          lambda m, ps, c: _plain(_pto("Shampoo")(ps, preconditioning_compute_steps=_freq(c))))],
    "galore": [Reference("pytorch_optimizer.GaLore", _galore)],
    "sophia": [Reference("pytorch_optimizer.SophiaH", _sophia_h)],
}


@dataclass
class Subject:
    """One model copy, the parameters an optimizer gets, and an untimed forward/backward that fills their grads."""

    model: nn.Module
    params: list[torch.Tensor]
    batch: torch.Tensor

    def backward(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        self.model(self.batch).square().mean().backward()


def _subject(base: nn.Module, matrices_only: bool, width: int) -> Subject:
    model = copy.deepcopy(base)
    params = [p for p in model.parameters() if p.dim() == 2] if matrices_only else list(model.parameters())
    batch = torch.randn(BATCH, width, generator=torch.Generator().manual_seed(0))
    return Subject(model, params, batch)


BATCH = 32
"""Rows of the fixed input batch; only its gradients matter, and the forward/backward is not timed."""

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_interleaved(subjects: list[Subject], steps_fns: list[StepFn], warmup: int, steps: int,
                      clock: Callable[[], float]) -> list[list[float]]:
    """Seconds of each ``step()`` (after an untimed backward), calling them in turn (a, b, c, a, b, c, ...)
    after ``warmup`` calls each, so load from other processes on a shared machine falls on all alike."""
    for sub, fn in zip(subjects, steps_fns):
        for _ in range(warmup):
            sub.backward()
            fn()
    times: list[list[float]] = [[] for _ in steps_fns]
    for _ in range(steps):
        for sub, fn, ts in zip(subjects, steps_fns, times):
            sub.backward()
            t0 = clock()
            fn()
            ts.append(clock() - t0)
    return times


def _ours(name: str, sub: Subject, matrices_only: bool) -> tuple[StepFn, Any]:
    opt = po.build(name, sub.params if matrices_only else sub.model)
    return opt.step, po.get_spec(name).config()


def run(widths: list[int], layers: int, expand: int, warmup: int, steps: int, names: list[str],
        clock: str = "wall", progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Time every optimizer in ``names`` against its references and torch's AdamW on each width."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for width in widths:
        torch.manual_seed(0)
        base = Stack(width, layers, expand)
        n_params = sum(p.numel() for p in base.parameters())
        for name in names:
            for ref in REFERENCES.get(name, []) or [None]:
                matrices_only = bool(ref and ref.matrices_only)
                progress(f"width {width}: {name}" + (f" vs {ref.label}" if ref else ""))
                subs = [_subject(base, matrices_only, width) for _ in range(3)]
                try:
                    step, config = _ours(name, subs[0], matrices_only)
                    subs[0].backward()
                    step()
                except Exception as e:  # noqa: BLE001 - a module under construction must not stop the table
                    skipped.append({"optimizer": name, "width": str(width), "reason": f"{type(e).__name__}: {e}"})
                    break
                fns = [step, _plain(torch.optim.AdamW(subs[1].params, foreach=True))]
                label = None
                if ref is not None:
                    label = ref.label
                    try:
                        fns.append(ref.make(subs[2].model, subs[2].params, config))
                        subs[2].backward()
                        fns[-1]()
                    except Exception as e:  # noqa: BLE001 - a reference's failure is reported in the row
                        label = f"{ref.label} (failed: {type(e).__name__}: {e})"
                        fns.pop()
                ours, adamw, *theirs = _time_interleaved(subs[:len(fns)], fns, warmup, steps, CLOCKS[clock])
                med = statistics.median
                rows.append({
                    "width": width, "parameters": n_params, "optimizer": name,
                    "params": "2-D weights" if matrices_only else "all",
                    "ours_ms": med(ours) * 1e3, "reference": label,
                    "reference_ms": med(theirs[0]) * 1e3 if theirs else None,
                    "ratio": med(ours) / med(theirs[0]) if theirs else None,
                    "ratio_of_minima": min(ours) / min(theirs[0]) if theirs else None,
                    "torch_adamw_ms": med(adamw) * 1e3, "vs_torch_adamw": med(ours) / med(adamw),
                })
    return {"machine": machine(), "settings": {"widths": widths, "layers": layers, "expand": expand,
                                               "warmup": warmup, "steps": steps, "clock": clock},
            "registered": po.available(), "rows": rows, "skipped": skipped}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table (ratio = ours / reference; < 1 is faster)."""
    m, s = result["machine"], result["settings"]
    head = (f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}. "
            f"Model: {s['layers']} × [Linear(d, {s['expand']}d), Linear({s['expand']}d, d), LayerNorm]; "
            f"median of {s['steps']} steps after {s['warmup']} warm-up steps, {s['clock']} clock.")
    lines = [head, "",
             "| d | params | optimizer | timed on | ours (ms) | reference | ref (ms) | ours/ref | min/min "
             "| ours/torch AdamW |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---:|"]

    def f(x: float | None, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    for r in result["rows"]:
        lines.append(f"| {r['width']} | {r['parameters']:,} | {r['optimizer']} | {r['params']} | "
                     f"{f(r['ours_ms'], '.2f')} | {r['reference'] or '—'} | {f(r['reference_ms'], '.2f')} | "
                     f"{f(r['ratio'], '.2f')} | {f(r['ratio_of_minima'], '.2f')} | {f(r['vs_torch_adamw'], '.2f')} |")
    if result["skipped"]:
        lines += ["", "Skipped (raised):"]
        lines += [f"- {s['optimizer']} (d={s['width']}): {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--expand", type=int, default=1, help="hidden width factor of each block")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--optimizers", nargs="+", default=["all"], help="names, or all (every registered one)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (steadier on a loaded machine, with --threads 1)")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = po.resolve_names(args.optimizers)
    result = run(args.widths, args.layers, args.expand, args.warmup, args.steps, names, args.clock,
                 progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
