"""Table 3 of arXiv 2502.07488 (seed 004): optimizer-state memory of LLaMA 60M–1.3B in bf16, reproduced from
meta-device LLaMA models and ``precondtune.optim.state_bytes`` (docs/memory-table3.md explains every row).

What the table counts. Its numbers are optimizer states only (the "Weights" and "Gradient" columns are the
per-matrix formulas m·n; Adam's 0.23G for 60M is 2 states × 58.1M parameters × 2 bytes). Its unit "G" is
1.024·10⁹ bytes (millions of bytes divided by 1024): that is the only unit under which Adam's four figures
(0.23, 0.52, 1.44, 5.23) all round right — decimal GB gives 0.54/1.47/5.36, GiB 0.22/0.50/1.37/4.99.
Non-matrix parameters (embedding, head, RMSNorm scales) carry Adam's two states in every row with momentum,
which is precondtune's default routing (AdamW for the roles a matrix-only optimizer does not handle).

Models: the GaLore LLaMA configs the paper trains (vocab 32000, untied embedding and head, SwiGLU, RMSNorm):
60M d=512 f=1376 L=8; 130M d=768 f=2048 L=12; 350M d=1024 f=2736 L=24; "1.3B" d=2048 f=5461 L=24 (GaLore's
llama_1b, 1.34B parameters).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import precondtune.optim as po
from precondtune.inventory import inventory

G = 1.024e9
"""The paper's "G": 10⁶·1024 bytes (see the module docstring)."""
SIZES = ("60M", "130M", "350M", "1.3B")
CONFIGS = {"60M": (512, 1376, 8), "130M": (768, 2048, 12), "350M": (1024, 2736, 24), "1.3B": (2048, 5461, 24)}
GALORE_RANK = {"60M": 128, "130M": 256, "350M": 256, "1.3B": 512}
"""GaLore's ranks for these models (arXiv 2403.03507, Table 2)."""
VOCAB = 32000

PAPER = {  # Table 3, optimizer states in G
    "adam": (0.23, 0.52, 1.44, 5.23),
    "adadiag": (0.26, 0.62, 1.78, 6.61),
    "adadiag++": (0.36, 0.97, 3.03, 11.59),
    "adafactor w/ momentum": (0.18, 0.36, 0.85, 2.87),
    "adafactor w/o momentum": (0.06, 0.10, 0.13, 0.26),
    "adafacdiag w/ momentum": (0.21, 0.45, 1.19, 4.25),
    "adafacdiag w/o momentum": (0.09, 0.19, 0.47, 1.63),
    "hfac": (0.13, 0.19, 0.26, 0.52),
    "hfacdiag": (0.16, 0.29, 0.60, 1.89),
    "galore": (0.13, 0.28, 0.54, 1.78),
}

NON_MATRIX_TO_ADAMW = [{"match": "embedding|head|vector", "optimizer": "adamw"}]
ROWS = {  # row -> (optimizer, hyperparameters, routing)
    "adam": ("adamw", {}, None),
    "adadiag": ("adadiag", {}, None),
    "adadiag++": ("adadiag-pp", {}, None),
    "adafactor w/ momentum": ("adafactor", {"beta1": 0.9}, NON_MATRIX_TO_ADAMW),
    "adafactor w/o momentum": ("adafactor", {}, None),
    "adafacdiag w/ momentum": ("adafac-diag", {}, None),
    "adafacdiag w/o momentum": ("adafac-diag", {"betas": (0.0, 0.999)}, None),
    "hfac": ("hfac", {}, None),
    "hfacdiag": ("hfac-diag", {}, None),
    "galore": ("galore", {}, None),
}


class Block(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)


class Llama(nn.Module):
    """Parameters only (nothing here runs): what the optimizers see of a LLaMA decoder."""

    def __init__(self, d: int, f: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(Block(d, f) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)


def llama(size: str) -> nn.Module:
    with torch.device("meta"):
        return Llama(*CONFIGS[size])


def states(row: str, size: str) -> int:
    name, hp, routing = ROWS[row]
    if name not in po.available():
        pytest.skip(f"{name} is not registered")
    if name == "galore":
        hp = {"rank": GALORE_RANK[size]}
    return po.state_bytes(name, llama(size), state_dtype=torch.bfloat16, routing=routing, **hp)


def non_matrix_elements(size: str) -> int:
    return sum(i.numel for i in inventory(llama(size)) if i.role != "matrix")


def test_models_have_the_papers_parameter_counts():
    counts = [sum(p.numel() for p in llama(s).parameters()) for s in SIZES]
    assert [round(c / 1e6) for c in counts] == [58, 134, 368, 1339]
    assert {i.role for i in inventory(llama("60M"))} == {"matrix", "embedding", "head", "vector"}


EXACT = ["adam", "adadiag", "adadiag++", "adafactor w/ momentum", "adafacdiag w/ momentum", "hfac", "hfacdiag"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("row", EXACT)
def test_rows_reproduced_exactly(row, size):
    """These rows equal the paper's figures under precondtune's defaults (Adafactor w/ momentum with the
    non-matrix parameters routed to AdamW, as the paper counts them): within the ±0.005 of a two-decimal figure,
    plus 0.0001 for one borderline case (AdafacDiag w/ momentum, 130M: 0.45510 G, printed 0.45 — the paper
    seems to leave out the 0.35 MB of factored row/column statistics, which gives 0.45476)."""
    assert abs(states(row, size) / G - PAPER[row][SIZES.index(size)]) <= 0.0051


@pytest.mark.parametrize("size", SIZES)
def test_adafac_diag_without_momentum_counts_adamw_on_non_matrix(size):
    """Differs: without momentum the paper keeps ONE state (an unfactored second moment) for embedding, head and
    norm scales; precondtune routes them to AdamW (two states). The difference is exactly one state on them."""
    ours = states("adafacdiag w/o momentum", size)
    extra = non_matrix_elements(size) * 2  # the AdamW first moment, bf16
    assert abs((ours - extra) / G - PAPER["adafacdiag w/o momentum"][SIZES.index(size)]) <= 0.0051
    assert round(ours / G, 2) > PAPER["adafacdiag w/o momentum"][SIZES.index(size)]


@pytest.mark.parametrize("size", SIZES)
def test_adafactor_without_momentum_factors_embedding_and_head(size):
    """Differs: precondtune's Adafactor factors every ≥2-D tensor (Shazeer & Stern; torch.optim.Adafactor),
    embedding and head included, so their second moment is n + m elements; the paper counts them with an
    unfactored second moment (n·m). Replacing the factored statistics of the non-matrix tensors by full ones
    gives the paper's figure."""
    ours = states("adafactor w/o momentum", size)
    factored_non_matrix = sum(
        (i.shape[0] + i.shape[1]) if len(i.shape) == 2 else i.numel
        for i in inventory(llama(size)) if i.role != "matrix")
    paper_count = ours + (non_matrix_elements(size) - factored_non_matrix) * 2
    assert abs(paper_count / G - PAPER["adafactor w/o momentum"][SIZES.index(size)]) <= 0.0051


def test_galore_row_is_not_reproduced_by_any_single_counting():
    """Differs: with GaLore's published ranks (128/256/256/512) precondtune counts projector + two projected
    moments per matrix and AdamW on the rest: 0.16/0.33/0.64/2.04 G against the paper's 0.13/0.28/0.54/1.78.
    No single rank-and-counting rule reproduces all four paper figures (1.3B matches r=512 with one state on
    the non-matrix parameters, 60M would then need r≈265), so the row is checked against GaLore's own formula
    instead (docs/memory-table3.md)."""
    if "galore" not in po.available():
        pytest.skip("galore is not registered")
    ours = [states("galore", s) / G for s in SIZES]
    assert [round(x, 2) for x in ours] == [0.16, 0.33, 0.64, 2.04]
    for size in SIZES:
        d, f, layers = CONFIGS[size]
        r = GALORE_RANK[size]
        mats = [(d, d)] * 4 + [(f, d), (f, d), (d, f)]
        per_layer = sum(2 * r * max(a, b) + r * min(a, b) for a, b in mats)
        assert states("galore", size) == (layers * per_layer + 2 * non_matrix_elements(size)) * 2


def test_planning_allocates_nothing():
    model = llama("1.3B")
    assert all(p.is_meta for p in model.parameters())
    assert po.state_bytes("adadiag-pp", model, state_dtype=torch.bfloat16) > po.state_bytes(
        "adadiag", model, state_dtype=torch.bfloat16)
