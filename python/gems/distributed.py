"""Data-parallel training: GEMS averages the per-task gradients across ranks itself.

``opt.backward`` computes task gradients with ``torch.autograd.grad`` (or, with ``stash="projected"``,
projects them as autograd produces them), which DDP's reducer does not see, so GEMS all-reduces its own
stash at ``step`` (one flat buffer per task: full gradients and coordinates alike, projection being linear)
and broadcasts refreshed bases from rank 0 so that every rank projects with the same bases. Use a plain
(unwrapped) model, or DDP under ``no_sync()``, with ``opt.backward``; a single-task ``loss.backward()``
relies on DDP as usual."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def should_sync(mode: str) -> bool:
    return mode == "auto" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_task_gradients(stash, params: list[Tensor], layout: dict | None = None,
                              plain: list[Tensor] | None = None) -> None:
    """Replace each rank's task gradients by the sample-weighted mean over ranks: Σ_r N_t^r·G_t^r / Σ_r N_t^r,
    the gradient of the task's mean loss over the concatenated batch.

    ``layout`` maps the id of each weight held as coordinates (``stash="projected"``) to its coordinate
    shape per task; every other parameter travels as a full gradient. Squared norms are averaged the same
    way (an estimate: the norm of a mean is not the mean of norms) and a non-finite gradient on any rank
    marks the weight non-finite on all."""
    layout = layout or {}
    device = params[0].device
    if stash.form == "rows" and plain is not None:
        # one-backward form: the other parameters hold one mixed gradient, not one per task
        skip = {id(p) for p in plain}
        params = [p for p in params if id(p) not in skip]
        _all_reduce_mixed(stash, plain, device)
    for t in stash.tasks:
        grads, coords, sqnorms = stash.grads[t], stash.coords[t], stash.sqnorms[t]
        n_local = stash.samples[t]
        pieces = []
        # which parameters have a gradient of this task on some rank: the others (frozen, unused) must come
        # back without one, or the inner optimizer would step them (weight decay on a frozen weight)
        present = torch.tensor([float((coords if id(p) in layout else grads).get(id(p)) is not None)
                                for p in params], device=device)
        for p in params:
            shape = layout.get(id(p), {}).get(t)
            held = coords.get(id(p)) if shape is not None else grads.get(id(p))
            size = math.prod(shape) if shape is not None else p.numel()
            pieces.append((held.float() * n_local).flatten() if held is not None
                          else torch.zeros(size, device=device))
        projected = [p for p in params if id(p) in layout]
        sq = torch.stack([sqnorms[id(p)].float() * n_local if id(p) in sqnorms else torch.zeros((), device=device)
                          for p in projected]) if projected else torch.zeros(0, device=device)
        bad = torch.tensor([float(id(p) in stash.nonfinite) for p in projected], device=device)
        flat = torch.cat(pieces)
        meta = torch.tensor([n_local, stash.loss_sum[t]], dtype=torch.float64, device=device)
        for buf in (flat, sq, meta):
            dist.all_reduce(buf)
        for buf in (bad, present):
            dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        n_total = float(meta[0])
        if n_total > 0:
            flat.div_(n_total)
            sq.div_(n_total)
        offset = 0
        for p, here in zip(params, present.tolist()):
            shape = layout.get(id(p), {}).get(t)
            size = math.prod(shape) if shape is not None else p.numel()
            chunk = flat[offset:offset + size]
            offset += size
            if not here:
                continue
            if shape is not None:
                coords[id(p)] = chunk.view(shape).clone()
            else:
                grads[id(p)] = chunk.view_as(p).to(p.dtype).clone()
        for i, p in enumerate(projected):
            sqnorms[id(p)] = sq[i].clone()
            if bad[i] > 0:
                stash.nonfinite.add(id(p))
        stash.samples[t] = stash.base[t] = n_total  # the stash now holds the global mean
        stash.loss_sum[t] = float(meta[1])


def _all_reduce_mixed(stash, plain: list[Tensor], device) -> None:
    """The mixed gradients of the one-backward form: Σ_r W^r·g^r / Σ_r W^r (W: the rank's row weight)."""
    if not plain:
        return
    n_local = stash.mixed_samples
    present = torch.tensor([float(id(p) in stash.mixed) for p in plain], device=device)
    flat = torch.cat([(stash.mixed[id(p)].float() * n_local).flatten() if id(p) in stash.mixed
                      else torch.zeros(p.numel(), device=device) for p in plain])
    meta = torch.tensor([n_local], dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    dist.all_reduce(meta)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    n_total = float(meta[0])
    if n_total > 0:
        flat.div_(n_total)
    offset = 0
    for p, here in zip(plain, present.tolist()):
        chunk = flat[offset:offset + p.numel()]
        offset += p.numel()
        if here:
            stash.mixed[id(p)] = chunk.view_as(p).to(p.dtype).clone()
    stash.mixed_samples = stash.mixed_base = n_total


def broadcast_bases(subspaces) -> None:
    for w in subspaces:
        for b in w.bases.values():
            if b is not None:
                dist.broadcast(b, src=0)
