"""Optimizer step time, side by side in one run: every bundled optimizer against its public reference.

    python benchmarks/optimizer_step_time.py                    # markdown table on stdout
    python benchmarks/optimizer_step_time.py --json             # one JSON document on stdout
    python benchmarks/optimizer_step_time.py --widths 256 512 --steps 10 --optimizers adamw muon

The model is a stack of ``--layers`` blocks ``Linear(d, e·d) → Linear(e·d, d)`` with biases and a LayerNorm
(d = each of ``--widths``, e = ``--expand``). Gradients are fixed random tensors, so only ``optimizer.step()``
is timed: the median over ``--steps`` steps after ``--warmup`` steps, ours, the reference's and torch AdamW's
steps interleaved so that load from other processes falls on all of them alike. Periodic refreshes (eigenbases, inverse
roots, SVDs) run at the same frequency in both implementations and the median is the ordinary step; the
amortized refresh cost is what ``precondtune flops`` reports.

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


def _fill_grads(params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2


def _time_interleaved(steps_fns: list[StepFn], warmup: int, steps: int) -> list[float]:
    """Median seconds of each ``step()``, calling them in turn (a, b, c, a, b, c, ...) after ``warmup`` calls
    each, so load from other processes on a shared machine falls on all of them alike."""
    for fn in steps_fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in steps_fns]
    for _ in range(steps):
        for fn, ts in zip(steps_fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _subject(base: nn.Module, matrices_only: bool, seed: int) -> tuple[nn.Module, list[torch.Tensor]]:
    model = copy.deepcopy(base)
    params = [p for p in model.parameters() if p.dim() == 2] if matrices_only else list(model.parameters())
    _fill_grads(params, seed)
    return model, params


def _ours(name: str, base: nn.Module, matrices_only: bool, seed: int) -> tuple[StepFn, Any]:
    model, params = _subject(base, matrices_only, seed)
    opt = po.build(name, params if matrices_only else model)
    return opt.step, po.get_spec(name).config()


def run(widths: list[int], layers: int, expand: int, warmup: int, steps: int, names: list[str],
        progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
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
                try:
                    step, config = _ours(name, base, matrices_only, 0)
                    step()
                except Exception as e:  # noqa: BLE001 - a module under construction must not stop the table
                    skipped.append({"optimizer": name, "width": str(width), "reason": f"{type(e).__name__}: {e}"})
                    break
                model, params = _subject(base, matrices_only, 0)
                fns = [step, _plain(torch.optim.AdamW(params, foreach=True))]
                label = None
                if ref is not None:
                    label = ref.label
                    try:
                        model, params = _subject(base, matrices_only, 0)
                        fns.append(ref.make(model, params, config))
                        fns[-1]()
                    except Exception as e:  # noqa: BLE001 - a reference's failure is reported in the row
                        label = f"{ref.label} (failed: {type(e).__name__}: {e})"
                        fns.pop()
                ours, adamw, *theirs = _time_interleaved(fns, warmup, steps)
                rows.append({
                    "width": width, "parameters": n_params, "optimizer": name,
                    "params": "2-D weights" if matrices_only else "all",
                    "ours_ms": ours * 1e3, "reference": label,
                    "reference_ms": theirs[0] * 1e3 if theirs else None,
                    "ratio": ours / theirs[0] if theirs else None,
                    "torch_adamw_ms": adamw * 1e3, "vs_torch_adamw": ours / adamw,
                })
    return {"machine": machine(), "settings": {"widths": widths, "layers": layers, "expand": expand,
                                               "warmup": warmup, "steps": steps},
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
            f"median of {s['steps']} steps after {s['warmup']} warm-up steps.")
    lines = [head, "",
             "| d | params | optimizer | timed on | ours (ms) | reference | ref (ms) | ours/ref | ours/torch AdamW |",
             "|---|---:|---|---|---:|---|---:|---:|---:|"]

    def f(x: float | None, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    for r in result["rows"]:
        lines.append(f"| {r['width']} | {r['parameters']:,} | {r['optimizer']} | {r['params']} | "
                     f"{f(r['ours_ms'], '.2f')} | {r['reference'] or '—'} | {f(r['reference_ms'], '.2f')} | "
                     f"{f(r['ratio'], '.2f')} | {f(r['vs_torch_adamw'], '.2f')} |")
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
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = po.resolve_names(args.optimizers)
    result = run(args.widths, args.layers, args.expand, args.warmup, args.steps, names,
                 progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
