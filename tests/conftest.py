from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RUNNABLE_EXAMPLES = ("chargpt", "mlp", "cnn")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def load_example(name: str):
    """Import ``examples/<name>.py`` through precondtune's own loader (the model-file contract)."""
    from precondtune.modelfile import load_model_file

    return load_model_file(EXAMPLES / f"{name}.py")


def measured_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by tensors in ``opt.state``, each storage counted once (as ../shared/contract/check.py does)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def walk(v):
        nonlocal total
        if torch.is_tensor(v):
            st = v.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    for s in opt.state.values():
        walk(s)
    return total


@pytest.fixture
def example():
    return load_example


sys.path.insert(0, str(ROOT / "tests"))
