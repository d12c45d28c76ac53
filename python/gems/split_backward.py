"""One forward and one backward for all tasks: per-task weight gradients split by batch rows.

Samples are independent (no op of a causal LM mixes two rows of a batch), so for a Linear layer
Y = X·Wᵀ the gradient of the mean loss of task t is G_t = (N/N_t)·dY_tᵀ·X_t, with dY the gradient of the
mixed-batch mean loss and _t its rows of task t: the ordinary weight-gradient GEMM, split by rows. Between
refreshes only the coordinates are needed, and they never need the m×n matrix: Bᵀ·G_t = (dY_t·B)ᵀ·X_t
(left) and G_t·B = dY_tᵀ·(X_t·B) (right); ‖G_t‖² comes from the rows' Gram matrices when that is cheaper.

Targeted ``nn.Linear`` modules become :class:`RowSplitLinear` (same forward, same gradients under
``loss.backward()`` or the dict form of ``opt.backward``). While ``opt.backward(row_losses, task_ids=...)``
runs, their backward hands (X, dY) to the optimizer (``ROUTES``) instead of forming dW. Layers that mix rows
(batch norm, packed sequences with cross-row attention) break the premise: use the dict form for those."""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# id(weight) -> handler(x, dy), set only while opt.backward(row_losses, task_ids=...) runs. A module global,
# not a thread-local: autograd runs a CUDA graph's backward on its own device threads.
ROUTES: dict[int, Callable[[Tensor, Tensor], None]] = {}


class _LinearRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, key: int) -> Tensor:
        ctx.key = key  # id of the Parameter (forward may see another Python object for it)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # cast as autocast would, and keep the cast copies for backward
            dt = torch.get_autocast_dtype(dev)
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.to(x.dtype)
        gx = dy @ weight if ctx.needs_input_grad[0] else None
        gb = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        gw = None
        if ctx.needs_input_grad[1]:
            route = ROUTES.get(ctx.key)
            if route is None:
                gw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            else:
                route(x, dy)  # the optimizer stashes per-task gradients or coordinates; autograd gets none
        return gx, gw, gb, None


class RowSplitLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient GEMS can split by rows (see the module docstring). Only the class
    changes: parameters, state dict and the no-grad forward are nn.Linear's."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _LinearRows.apply(x, self.weight, self.bias, id(self.weight))
        return F.linear(x, self.weight, self.bias)


def convert(modules: Sequence[tuple[str, nn.Module]], targeted: set[int]) -> set[int]:
    """Switch the exact ``nn.Linear`` modules holding a targeted weight to RowSplitLinear (subclasses keep
    their own forward and stay unsplittable). Returns the ids of the weights that can be split."""
    done = set()
    for _, m in modules:
        if id(m.weight) not in targeted:
            continue
        if type(m) is nn.Linear:
            m.__class__ = RowSplitLinear
        if type(m) is RowSplitLinear:
            done.add(id(m.weight))
    return done


def task_rows(task_ids, tasks: Sequence[str], n: int, device: torch.device) -> Tensor:
    """Per row, the index of its task in ``tasks`` (task names, or integer ids), checked."""
    if not isinstance(task_ids, (Tensor, str)):
        task_ids = list(task_ids)
        if task_ids and all(isinstance(t, int) and not isinstance(t, bool) for t in task_ids):
            task_ids = torch.tensor(task_ids, dtype=torch.long)
    if isinstance(task_ids, Tensor):
        if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool or task_ids.dim() != 1:
            raise TypeError("task_ids as a tensor must be a 1-D integer tensor of task indices")
        idx = task_ids.to(device=device, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(tasks)):
            raise ValueError(f"task_ids must index the tasks {list(tasks)} (0..{len(tasks) - 1}), "
                             f"got values in [{int(idx.min())}, {int(idx.max())}]")
    else:
        if isinstance(task_ids, str):
            raise TypeError("task_ids must be one task per row (a list of names or an integer tensor), not a string")
        names = list(task_ids)
        where = {t: i for i, t in enumerate(tasks)}
        unknown = sorted({t for t in names if t not in where}, key=str)
        if unknown:
            raise KeyError(f"unknown task name(s) {unknown} in task_ids; the tasks are {list(tasks)}")
        idx = torch.tensor([where[t] for t in names], dtype=torch.long, device=device)
    if idx.numel() != n:
        raise ValueError(f"task_ids has {idx.numel()} entries but the loss has {n} rows (one task per row)")
    return idx


def row_selectors(idx: Tensor, n_tasks: int) -> list[slice | Tensor | None]:
    """Per task, its rows as a slice when they are contiguous (no copy when indexing), else an index tensor;
    None for a task without rows."""
    out: list[slice | Tensor | None] = []
    values = idx.tolist()
    for t in range(n_tasks):
        rows = [i for i, v in enumerate(values) if v == t]
        if not rows:
            out.append(None)
        elif rows[-1] - rows[0] + 1 == len(rows):
            out.append(slice(rows[0], rows[-1] + 1))
        else:
            out.append(torch.tensor(rows, dtype=torch.long, device=idx.device))
    return out


def rows_of(t: Tensor, sel: slice | Tensor) -> Tensor:
    """The rows ``sel`` of a (batch, ..., features) activation, flattened to (tokens, features)."""
    part = t[sel] if isinstance(sel, slice) else t.index_select(0, sel)
    return part.reshape(-1, t.shape[-1])


def task_gradient(x: Tensor, dy: Tensor, scale: float) -> Tensor:
    """G_t = scale·dYᵀ·X in fp32 (x, dy: (tokens, features) rows of one task)."""
    return (dy.T @ x).float().mul_(scale)


def task_coordinates(x: Tensor, dy: Tensor, basis: Tensor, side: str, scale: float) -> tuple[Tensor, Tensor]:
    """Coordinates of G_t = scale·dYᵀ·X against ``basis`` on ``side``, and ‖G_t‖², without forming G_t
    when the Gram form is cheaper (tokens·(m+n) < m·n)."""
    xf, dyf = x.float(), dy.float()
    if side == "left":
        coords = (dyf @ basis).T @ xf
    else:
        coords = dyf.T @ (xf @ basis)
    coords.mul_(scale)
    rows, (m, n) = xf.shape[0], (dyf.shape[1], xf.shape[1])
    if rows * (m + n) < m * n:
        sq = ((dyf @ dyf.T) * (xf @ xf.T)).sum().clamp_min(0)  # ‖dYᵀX‖² = Σ_ij (dY dYᵀ)_ij (X Xᵀ)_ij
    else:
        sq = torch.linalg.vector_norm(dyf.T @ xf).square()
    return coords, sq * (scale * scale)


def check_row_losses(losses, row_weights) -> tuple[Tensor, Tensor]:
    """The per-row losses (1-D, requiring grad) and per-row weights (default 1), checked."""
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() == 0:
        raise ValueError("with task_ids, opt.backward takes a 1-D tensor of per-row losses (one per sample)")
    if not losses.requires_grad:
        raise ValueError("the per-row losses do not require grad (computed under no_grad, or detached?)")
    if row_weights is None:
        weights = torch.ones(losses.shape, dtype=torch.float32, device=losses.device)
    else:
        weights = torch.as_tensor(row_weights, dtype=torch.float32, device=losses.device)
        if weights.shape != losses.shape:
            raise ValueError(f"row_weights has shape {tuple(weights.shape)}, the losses {tuple(losses.shape)}")
        values = weights.tolist()
        if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
            raise ValueError("row_weights must be finite, non-negative and not all zero")
    return losses, weights


def run(opt, losses: Tensor, task_ids, row_weights, retain_graph: bool) -> None:
    """``opt.backward(row_losses, task_ids=...)``: one backward of the mixed-batch weighted mean loss.

    Targeted weights get each task's gradient (stash="full") or, between refreshes, its coordinates and
    squared norm (stash="projected"; on a refresh step the full G_t of every task, refreshed in backward as
    the per-task-backward path does). Every other parameter gets the mixed gradient, kept once (not per task).
    Task t counts N_t = Σ of its rows' weights as its samples, as ``num_samples`` does in the dict form."""
    from gems import distributed

    stash = opt._task_grads
    tasks = opt.tasks
    losses, weights = check_row_losses(losses, row_weights)
    idx = task_rows(task_ids, tasks, losses.numel(), losses.device)
    unsplit = [w.name for w in opt._subspaces if id(w.param) not in opt._row_split]
    if unsplit:
        raise ValueError(f"opt.backward(..., task_ids=...) splits the gradients of nn.Linear weights by rows; "
                         f"{len(unsplit)} targeted weight(s) are not in a plain nn.Linear of the model given "
                         f"as model= (embeddings, Linear subclasses, or no model=): {', '.join(unsplit[:5])}. "
                         "Use the dict form opt.backward({task: loss}) for them")
    stash.begin("rows")
    n_rows = losses.numel()
    sels = row_selectors(idx, len(tasks))
    w_host = weights.tolist()
    counts = [sum(w_host[i] for i, v in enumerate(idx.tolist()) if v == k) for k in range(len(tasks))]
    total = sum(counts)
    present = [k for k in range(len(tasks)) if counts[k] > 0]
    detached = (losses.detach().float() * weights).tolist()
    task_loss = {k: sum(detached[i] for i, v in enumerate(idx.tolist()) if v == k) / counts[k] for k in present}
    alphas = {k: stash.weight_of(tasks[k], counts[k]) for k in present}
    alpha_mix = stash.weight_of_mixed(total)
    scales = {k: total / counts[k] for k in present}
    mix = [c / total for c in counts]
    refresh_here = not distributed.should_sync(opt.sync) and len(present) == len(tasks)
    by_id = {id(w.param): w for w in opt._subspaces}
    due = {k for k, w in by_id.items() if w.step >= w.next_refresh and k not in stash.refreshed}
    pending = opt._backward_refresh_batch()
    lock = threading.Lock()

    def route(x: Tensor, dy: Tensor, w) -> None:
        key = id(w.param)
        if x.dim() < 2 or x.shape[0] != n_rows:
            raise RuntimeError(f"{w.name}: its input has {x.shape[0] if x.dim() else 0} rows in the first "
                               f"(batch) dimension but the loss has {n_rows}: task_ids must give one task per "
                               "batch row of the model's input")
        if key in stash.nonfinite:
            return
        parts = [(k, rows_of(x, sels[k]), rows_of(dy, sels[k])) for k in present]
        full = opt.stash == "full" or key in due or (opt.nullspace_mode == "gradient" and w.protected is not None)
        if not full:
            for k, xk, dk in parts:
                coords, sq = task_coordinates(xk, dk, opt._task_bases(w, tasks[k]), w.side, scales[k])
                stash.add_projected(tasks[k], key, coords, sq, alphas[k])
            return
        grads = {k: task_gradient(xk, dk, scales[k]) for k, xk, dk in parts}
        if opt.stash == "projected" and key not in due:  # nullspace_mode="gradient": project G_t first
            for k, g in grads.items():
                opt._stash_projected(w, tasks[k], g, alphas[k])
        elif opt.stash == "projected" and refresh_here:
            acc = []
            for k in range(len(tasks)):
                g = grads[k].mul_(alphas[k])
                earlier = stash.grads[tasks[k]].pop(key, None)  # full gradients of earlier micro-batches
                acc.append(g if earlier is None else earlier.add_(g))
            item = opt._backward_refresh_job(w, acc, mix)
            if item is not None:
                with lock:  # autograd runs each device's backward on its own thread
                    pending.add(item, w.param.device)
        else:
            for k, g in grads.items():
                stash.add_full(tasks[k], w.param, g, alpha=alphas[k])

    def on_grad(p: Tensor) -> None:
        g, p.grad = p.grad, None
        if g is None:
            return  # the hook also fires for a weight whose Function returned no gradient
        if id(p) in by_id:
            raise RuntimeError(f"{by_id[id(p)].name} got an ordinary gradient: it is used outside its Linear "
                               "module (tied to another layer?), so its gradient cannot be split by rows. Untarget "
                               "it or use the dict form opt.backward({task: loss})")
        stash.add_mixed(p, g, alpha_mix)

    params = [p for p in opt._all_params if p.requires_grad]
    held = {id(p): p.grad for p in params}  # the user's own .grad (if any) is set aside, untouched
    for p in params:
        p.grad = None
    handles = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
    ROUTES.update({id(w.param): (lambda x, dy, w=w: route(x, dy, w)) for w in opt._subspaces})
    try:
        mean = (losses * (weights / total)).sum()
        torch.autograd.backward(mean, retain_graph=retain_graph)
        pending.finish()
    except BaseException:
        stash.clear()  # a half-collected step would be silently wrong; redo the micro-batches
        raise
    finally:
        for w in opt._subspaces:
            ROUTES.pop(id(w.param), None)
        for h in handles:
            h.remove()
        for p in params:
            p.grad = held[id(p)]
    for k in present:
        stash.count(tasks[k], task_loss[k], counts[k])
    stash.count_mixed(total)
