"""Dtype names as users type them (``fp32``, ``bf16``, ...) and their torch dtypes."""
from __future__ import annotations

import torch

from .errors import UnknownNameError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
_ALIASES = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "float64": "fp64", "double": "fp64",
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; unknown names list the valid ones."""
    if isinstance(name, torch.dtype):
        return name
    key = name.strip().lower().replace("torch.", "")
    key = _ALIASES.get(key, key)
    if key not in DTYPES:
        raise UnknownNameError("dtype", name, list(DTYPES))
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``."""
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    return str(dtype).replace("torch.", "")


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype, device="meta").element_size()
