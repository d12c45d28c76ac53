"""Data-parallel training: GEMS averages the per-task gradients across ranks itself.

``opt.backward`` computes task gradients with ``torch.autograd.grad``, which DDP's reducer does not see, so
GEMS all-reduces its own stash at ``step`` (one flat buffer per task) and broadcasts refreshed bases from
rank 0 so that every rank projects with the same bases. Use a plain (unwrapped) model, or DDP under
``no_sync()``, with ``opt.backward``; a single-task ``loss.backward()`` relies on DDP as usual."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def should_sync(mode: str) -> bool:
    return mode == "auto" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_task_gradients(stash, params: list[Tensor]) -> None:
    """Replace each rank's task gradients by the sample-weighted mean over ranks: Σ_r N_t^r·G_t^r / Σ_r N_t^r,
    the gradient of the task's mean loss over the concatenated batch."""
    world = dist.get_world_size()
    for t in stash.tasks:
        grads = stash.grads[t]
        n_local = stash.samples[t]
        device = params[0].device
        flat = torch.cat([(grads[id(p)].float() * n_local).flatten() if id(p) in grads
                          else torch.zeros(p.numel(), device=device) for p in params])
        meta = torch.tensor([n_local, stash.loss_sum[t]], dtype=torch.float64, device=device)
        dist.all_reduce(flat)
        dist.all_reduce(meta)
        n_total = float(meta[0])
        if n_total > 0:
            flat.div_(n_total)
        offset = 0
        for p in params:
            grads[id(p)] = flat[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        stash.samples[t] = n_total
        stash.loss_sum[t] = float(meta[1]) / world


def broadcast_bases(subspaces) -> None:
    for w in subspaces:
        for b in w.bases.values():
            if b is not None:
                dist.broadcast(b, src=0)
