"""The report a person reads after ``precondtune plan``: ``report.md`` and its PNG plots (matplotlib)."""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .units import human_bytes

if TYPE_CHECKING:
    from .plan import Candidate, PlanResult

GiB = float(1 << 30)


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(float(x))


def _pct(x: Any) -> str:
    return f"{100 * float(x):.2f}%" if _finite(x) else "-"


def _num(x: Any, fmt: str = ".4f") -> str:
    return format(float(x), fmt) if _finite(x) else "-"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def plots(result: PlanResult, out: Path) -> dict[str, Path]:
    """memory.png, overhead.png, loss_curves.png, search_history.png (those with something to show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, Path] = {}
    cands = result.candidates
    ms = result.memory["settings"]
    budget = ms["gpu_memory_bytes"] - ms.get("reserve_bytes", 0) if ms.get("gpu_memory_bytes") else None

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(cands) + 1.5))
    names = [c.name for c in cands]
    largest = max([c.memory["bytes"]["total_peak"] for c in cands] + [1])
    on_scale = budget is not None and largest > 0.05 * budget
    top = max(largest, budget) if budget and on_scale else largest
    unit, scale = ("GiB", GiB) if top >= GiB else ("MiB", float(1 << 20))
    peaks = [c.memory["bytes"]["total_peak"] / scale for c in cands]
    state = [c.memory["bytes"]["optimizer_state"] / scale for c in cands]
    ax.barh(names, peaks, color=["tab:blue" if c.fits else "tab:red" for c in cands], label="total peak")
    ax.barh(names, state, color="tab:orange", alpha=0.8, label="optimizer state")
    if budget and on_scale:
        ax.axvline(float(budget) / scale, color="k", ls="--", label="budget")
    note = f" (the {budget / GiB:.1f} GiB budget is off this scale)" if budget and not on_scale else ""
    ax.set_xlabel(f"{unit} per GPU{note}")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title("memory per optimizer against the budget")
    files["memory_plot"] = _save(fig, out / "memory.png")
    plt.close(fig)

    # a model whose forward+backward FlopCounterMode counts nothing (no matmul or convolution) has no overhead
    with_cost = [c for c in cands if c.cost and _finite(c.cost.get("overhead"))]
    if with_cost:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(with_cost) + 1.5))
        ax.barh([c.name for c in with_cost], [100 * c.cost["overhead"] for c in with_cost], label="FLOP overhead")
        adamw = result.by_name.get("adamw")
        if adamw is not None and adamw.step_seconds:
            timed = [(c.name, 100 * (c.step_seconds / adamw.step_seconds - 1)) for c in with_cost if c.step_seconds]
            if timed:
                ax.scatter([t for _, t in timed], [n for n, _ in timed], color="k", zorder=3,
                           label="measured step time vs AdamW")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("% of forward+backward")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
        ax.set_title("optimizer compute overhead")
        files["overhead_plot"] = _save(fig, out / "overhead.png")
        plt.close(fig)

    ranked = [c for c in cands if c.curve]
    if ranked:
        fig, ax = plt.subplots(figsize=(8, 5))
        finals = []
        for c in ranked:
            by_time = result.settings.rank_by == "time" and c.step_seconds
            # x: steps × the side-by-side measured step time, the clock the ranking itself used
            xs = [(i + 1) * c.step_seconds for i in range(len(c.curve))] if by_time else range(1, len(c.curve) + 1)
            w = max(1, len(c.curve) // 20)
            smooth = [sum(c.curve[max(0, i - w + 1): i + 1]) / len(c.curve[max(0, i - w + 1): i + 1])
                      for i in range(len(c.curve))]
            finals.append(smooth[-1])
            ax.plot(list(xs), smooth, label=c.name, lw=2.2 if c.name == result.winner else 1.0)
        if finals and all(math.isfinite(f) for f in finals):
            ax.set_ylim(top=min(ax.get_ylim()[1], 2.0 * max(finals)))  # the interesting part, not the first steps
        ax.set_xlabel("seconds" if result.settings.rank_by == "time" else "step")
        ax.set_ylabel("training loss (moving mean)")
        ax.set_title(f"best config per optimizer (seed {result.settings.seed})")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
        files["loss_plot"] = _save(fig, out / "loss_curves.png")
        plt.close(fig)

    searched = [c for c in cands if c.search is not None and not c.search.frame.empty]
    if searched:
        fig, ax = plt.subplots(figsize=(8, 5))
        for c in searched:
            f = c.search.frame.sort_values("number")
            done = f[f["state"] == "COMPLETE"]
            if len(done):
                ax.plot(done["number"], done["value"].cummin(), marker="o", ms=3, label=c.name)
        ax.set_xlabel("trial")
        ax.set_ylabel("best eval loss so far")
        ax.set_title("search history")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
        files["history_plot"] = _save(fig, out / "search_history.png")
        plt.close(fig)
    return files


def _hp(hp: dict[str, Any] | None) -> str:
    if not hp:
        return "-"
    parts = []
    for k, v in hp.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, tuple)):
            v = "[" + ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v) + "]"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def _status(c: Candidate) -> str:
    return c.status + (f" ({c.note})" if c.note else "")


def markdown(result: PlanResult, files: dict[str, Path]) -> str:
    """``report.md``: what was compared, why the winner won, the tables, the evidence, how to reproduce."""
    s = result.settings
    mem_settings = result.memory["settings"]
    lines = [f"# precondtune plan: `{result.mf.path}`", "",
             f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} in {result.seconds:.0f} s.", ""]
    lines += ["## Recommendation", ""]
    if result.winner:
        lines += [f"**{result.winner}** — {result.reason}.", "",
                  "Load it in a training script with one line:", "", "```python",
                  f"opt = precondtune.build_optimizer(model, \"{files.get('config', Path('recommended.yaml')).name}\")",
                  "```", ""]
    else:
        lines += [f"No recommendation: {result.reason}.", ""]

    p = result.profile
    lines += ["## What was compared", "",
              (f"- Model: {p.trainable_parameters:,} trainable parameters "
              f"({', '.join(f'{k} {v:,}' for k, v in p.roles.items() if v)})."),
              f"- One step: batch {p.batch_size}, {p.tokens_per_batch:,} tokens, "
              f"{p.train_flops_per_step:,} FLOPs forward+backward; device {p.device}"
              + (f", measured {p.step_seconds * 1e3:.1f} ms per forward+backward." if p.step_seconds else "."),
              (f"- Memory judged against {mem_settings.get('gpu')} ({mem_settings.get('gpu_source', '')}), "
              f"world size {mem_settings.get('world_size')}, sharding {mem_settings.get('sharding')}."),
              *([f"- Searches: {s.trials} trials per optimizer, {s.steps} steps each (warmup + cosine decay), "
                 f"batch {s.batch_size}, objective = mean loss on fixed evaluation batches; AdamW searched with the "
                 "same budget as the baseline"
                 + (f"; warm starts transferred from AdamW lr={s.adamw.lr:g}." if s.adamw else "."),
                 f"- Ranking: best config of each optimizer re-run on {s.seeds} seed(s) "
                 + ("at equal wall-clock (steps that fit into the time AdamW's run took, from measured step times)."
                    if s.rank_by == "time" else "at equal steps.")]
                if not result.meta else
                ["- Searches and ranking: not run (the model is on the meta device; see the recommendation)."]), ""]

    ranked = sorted(result.candidates, key=lambda c: (c.median is None, c.median or 0.0))
    lines += ["## Ranking", "", _table(
        ["optimizer", "median eval loss", "seed spread", "steps", "step time (ms)", "status", "best hyperparameters"],
        [[("**" + c.name + "**") if c.name == result.winner else c.name, _num(c.median),
          _num(c.spread if c.median is not None and len(c.rank_losses) > 1 else None),  # one seed: unmeasured
          c.rank_steps or "-", _num(c.step_seconds * 1e3 if c.step_seconds else None, ".1f"), _status(c),
          _hp(c.hyperparameters)] for c in ranked]), ""]
    if result.timing_warning:
        lines += [f"**Warning:** {result.timing_warning}.", ""]
    if result.dtype_note:
        lines += [f"**Note:** {result.dtype_note}.", ""]
    if "loss_plot" in files:
        lines += ["![loss curves](loss_curves.png)", ""]

    lines += ["## Memory", "", _table(
        ["optimizer", "optimizer state", "total peak", "peak phase", "fits", "headroom"],
        [[c.name, human_bytes(c.memory["bytes"]["optimizer_state"]), human_bytes(c.memory["bytes"]["total_peak"]),
          c.memory.get("peak_phase", "-"), "yes" if c.fits else "**no**", human_bytes(c.memory.get("headroom_bytes"))]
         for c in result.candidates]), ""]
    if "memory_plot" in files:
        lines += ["![memory](memory.png)", ""]

    lines += ["## Compute overhead", "", _table(
        ["optimizer", "step FLOPs", "amortized FLOPs", "FLOP overhead", "measured step (ms)", "time vs AdamW"],
        [[c.name, f"{c.cost['step_flops']:,}", f"{c.cost['amortized_step_flops']:,.0f}", _pct(c.cost["overhead"]),
          _num(c.step_seconds * 1e3 if c.step_seconds else None, ".1f"),
          _pct(c.step_seconds / result.by_name["adamw"].step_seconds - 1)
          if c.step_seconds and result.by_name.get("adamw") and result.by_name["adamw"].step_seconds else "-"]
         for c in result.candidates if c.cost]), "",
        ("FLOP overhead = amortized optimizer FLOPs / forward+backward FLOPs (refreshes spread over their period). "
        "Measured step times: each tuned config's whole training step, timed side by side on this device with its "
        "refreshes amortized over the tuned period."), ""]
    if "overhead_plot" in files:
        lines += ["![overhead](overhead.png)", ""]

    if result.meta:
        lines += ["## Reproduce", "", "```bash", result.command or f"precondtune plan {result.mf.path}", "```", ""]
        return "\n".join(lines)
    lines += ["## Search evidence", "", f"Storage: `{result.storage}` (open it with `optuna-dashboard`).", "",
              _table(["optimizer", "study", "complete", "pruned", "failed", "best search loss"],
                     [[c.name, c.search.study, c.search.counts.get("complete", 0), c.search.counts.get("pruned", 0),
                       c.search.counts.get("failed", 0), _num(c.search.best_value)]
                      for c in result.candidates if c.search is not None]), "",
              "Every trial is in `results.csv`."]
    if "history_plot" in files:
        lines += ["", "![search history](search_history.png)"]
    lines += ["", "## Reproduce", "", "```bash", result.command or f"precondtune plan {result.mf.path}", "```", "",
              "Rerunning with the same `--storage` reuses the finished trials.", ""]
    return "\n".join(lines)
