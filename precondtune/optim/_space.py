"""Search-space helpers shared by the optimizers' ``search_space(trial, base)`` (Optuna define-by-run).

Learning rates are searched on a log scale, centred on ``base.lr`` (e.g. the AdamW-transferred value) when a
base config is given; momentum-like betas are searched as 1−β on a log scale, where their effect is linear.
"""
from __future__ import annotations

from typing import Any

LR_SPAN = 10.0
"""A transferred learning rate is searched within ×/÷ this factor."""


def suggest_lr(trial: Any, default: float, base: Any = None, *, low: float | None = None, high: float | None = None,
               name: str = "lr") -> float:
    """Log-uniform lr: ``[base.lr/10, base.lr·10]`` when a base is given, else ``[low, high]`` around ``default``."""
    center = getattr(base, name, None) if base is not None else None
    if center:
        return trial.suggest_float(name, center / LR_SPAN, center * LR_SPAN, log=True)
    return trial.suggest_float(name, low or default / 30, high or default * 30, log=True)


def suggest_beta(trial: Any, name: str, low: float, high: float) -> float:
    """β in ``[low, high]`` sampled as 1−β on a log scale; the trial param is named ``one_minus_<name>``."""
    return 1 - trial.suggest_float(f"one_minus_{name}", 1 - high, 1 - low, log=True)
