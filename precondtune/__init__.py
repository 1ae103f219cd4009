"""precondtune: will it fit, what does it cost, how should it be set — for preconditioned optimizers.

Stable Python API (SPEC.md): ``precondtune.optim.available()``, ``precondtune.optim.build(...)``,
``precondtune.build_optimizer(model, config)`` and ``precondtune.estimate_memory(model, optimizer, ...)``.
"""
from __future__ import annotations

from typing import Any

from . import optim
from .errors import ConfigError, ModelFileError, PrecondtuneError

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelFileError", "PrecondtuneError", "build_optimizer", "estimate_memory", "optim"]


def build_optimizer(model: Any, config: Any) -> Any:
    """A working ``torch.optim.Optimizer`` for ``model`` from a recommended-config file path or dict."""
    from .config import build_optimizer as _build

    return _build(model, config)


def estimate_memory(model: Any, optimizer: str, **kwargs: Any) -> dict[str, Any]:
    """The memory budget of one optimizer (same shape as one entry of ``precondtune memory --json``)."""
    from .memory import estimate_memory as _estimate

    return _estimate(model, optimizer, **kwargs)
