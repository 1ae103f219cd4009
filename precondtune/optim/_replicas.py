"""Data-parallel replicas: optimizers whose statistics come from each rank's own batch (Sophia's Hessian
estimate, Iso's covariances) average them over a DistributedDataParallel model's replicas, as DDP averages
gradients; otherwise the replicas' states, and then their weights, drift apart."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn


def replica_group(model: nn.Module, who: str) -> Any:
    """The process group of a DistributedDataParallel-wrapped ``model`` with more than one replica, else None;
    warns when several processes run and ``model`` is not DDP-wrapped (a DDP run that passed ``model.module``
    would drift)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        return model.process_group if torch.distributed.get_world_size(model.process_group) > 1 else None
    if torch.distributed.get_world_size() > 1:
        warnings.warn(f"{who}: torch.distributed runs {torch.distributed.get_world_size()} processes but the model "
                      "given is not DistributedDataParallel-wrapped; under DDP pass the wrapped model, so that the "
                      "statistics each rank gathers from its own batch are averaged over the replicas", stacklevel=3)
    return None


def average_over(group: Any, *tensors: Tensor) -> None:
    """Each tensor replaced in place by its mean over the group's ranks."""
    world = torch.distributed.get_world_size(group)
    for t in tensors:
        torch.distributed.all_reduce(t, group=group)
        t.div_(world)
