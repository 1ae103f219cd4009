"""Parameter inventory: every trainable parameter once, with its role decided by module type and shape.

Roles (SPEC.md): ``matrix`` (2-D weights of hidden ``nn.Linear`` and other 2-D weights), ``embedding``,
``head`` (the output projection, tied or not), ``vector`` (biases, norm scales, any ≤1-D tensor), ``conv``
(≥3-D kernels of ``nn.ConvNd``), ``batched`` (other ≥3-D parameters, e.g. stacked experts).

The head is found structurally, never from a name: an ``nn.Linear`` whose weight is tied to an
``nn.Embedding``, else an ``nn.Linear`` whose ``out_features`` equals an embedding's vocabulary, else the last
``nn.Linear`` registered in the model (the classifier of a CNN/MLP). Routing rules in a config override any role.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ROLES = ("matrix", "embedding", "head", "vector", "conv", "batched")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBED = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class ParamInfo:
    """One trainable parameter: where it lives, its shape and dtype, and its role.

    ``extra`` carries structure some optimizers need, e.g. ``{"heads": 8, "attention": "in_proj"}`` for
    ``nn.MultiheadAttention``'s packed q/k/v projection (Adam-mini's head-wise blocks).
    """

    name: str
    module_path: str
    module_type: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str
    tied_names: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    param: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _head_modules(model: nn.Module) -> set[int]:
    """ids of the ``nn.Linear`` modules that are the output projection (see module docstring)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    embeds = [m for m in model.modules() if isinstance(m, _EMBED)]
    embed_weights = {id(e.weight) for e in embeds}
    tied = {id(m) for m in linears if id(m.weight) in embed_weights}
    if tied:
        return tied
    vocab = {e.num_embeddings for e in embeds}
    by_vocab = [m for m in linears if m.out_features in vocab]
    if by_vocab:
        return {id(by_vocab[-1])}
    return {id(linears[-1])} if linears else set()


def _role(module: nn.Module, pname: str, p: torch.Tensor, heads: set[int]) -> str:
    if p.dim() <= 1:
        return "vector"
    if isinstance(module, _EMBED) and pname == "weight":
        return "embedding"
    if isinstance(module, nn.Linear) and pname == "weight":
        return "head" if id(module) in heads else "matrix"
    if isinstance(module, _CONV) and pname == "weight":
        return "conv"
    if p.dim() == 2:
        return "matrix"
    return "batched"


def inventory(model: nn.Module, *, include_frozen: bool = False) -> list[ParamInfo]:
    """Every (trainable) parameter of ``model`` once, in registration order, with its role.

    Tied weights appear once; a weight shared by an embedding and the output projection is a ``head``
    (SPEC.md: the output projection is a head whether or not it is tied). Works on meta-device models.
    """
    heads = _head_modules(model)
    # nn.MultiheadAttention reads its out_proj's weight directly and never calls that Linear's forward
    unhooked = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    seen: dict[int, int] = {}
    out: list[dict[str, Any]] = []
    for mpath, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            if p is None or (not p.requires_grad and not include_frozen):
                continue
            full = f"{mpath}.{pname}" if mpath else pname
            role = _role(module, pname, p, heads)
            extra: dict[str, Any] = {}
            if isinstance(module, nn.MultiheadAttention) and pname == "in_proj_weight":
                extra = {"heads": module.num_heads, "attention": "in_proj"}
            if isinstance(module, nn.Linear) and pname == "weight" and id(module) not in unhooked:
                extra = {"linear": True}  # a called nn.Linear's weight (optimizers that hook Linear layers need one)
            if id(p) in seen:
                entry = out[seen[id(p)]]
                if full not in entry["tied_names"] and full != entry["name"]:
                    entry["tied_names"] = (*entry["tied_names"], full)
                if role == "head":
                    entry["role"] = "head"
                continue
            seen[id(p)] = len(out)
            out.append(dict(
                name=full, module_path=mpath, module_type=type(module).__name__, shape=tuple(p.shape),
                dtype=p.dtype, role=role, tied_names=(), extra=extra, param=p,
            ))
    return [ParamInfo(**d) for d in out]


def role_counts(infos: Iterable[ParamInfo]) -> dict[str, int]:
    """Parameters (elements) per role, every role present with 0 for absent ones."""
    c: Counter[str] = Counter()
    for i in infos:
        c[i.role] += i.numel
    return {r: c.get(r, 0) for r in ROLES}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(all, trainable)`` parameter elements, tied weights counted once."""
    total = sum(i.numel for i in inventory(model, include_frozen=True))
    trainable = sum(i.numel for i in inventory(model))
    return total, trainable


def infos_for_params(params: Iterable[torch.Tensor]) -> list[ParamInfo]:
    """Roles for a bare list of tensors (no modules to look at): ≤1-D -> vector, 2-D -> matrix, else batched."""
    out = []
    for k, p in enumerate(params):
        role = "vector" if p.dim() <= 1 else "matrix" if p.dim() == 2 else "batched"
        out.append(ParamInfo(name=f"param{k}", module_path="", module_type="", shape=tuple(p.shape),
                             dtype=p.dtype, role=role, param=p))
    return out
