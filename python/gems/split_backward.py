"""One forward and one backward for all tasks: per-task weight gradients split by batch rows.

Samples are independent (no op of a causal LM mixes two rows of a batch), so for a Linear layer
Y = X·Wᵀ the gradient of the mean loss of task t is G_t = (N/N_t)·dY_tᵀ·X_t, with dY the gradient of the
mixed-batch mean loss and _t its rows of task t: the ordinary weight-gradient GEMM, split by rows. Between
refreshes only the coordinates are needed, and they never need the m×n matrix: Bᵀ·G_t = (dY_t·B)ᵀ·X_t
(left) and G_t·B = dY_tᵀ·(X_t·B) (right); ‖G_t‖² comes from the rows' Gram matrices when that is cheaper.

Targeted ``nn.Linear`` modules become :class:`RowSplitLinear` (same forward, same gradients under
``loss.backward()`` or the dict form of ``opt.backward``), targeted embeddings :class:`RowSplitEmbedding`
(dW is a scatter-add of dY's rows, so G_t·B is a scatter-add of dY_t·B). While
``opt.backward(row_losses, task_ids=...)`` runs, their backward hands a :class:`Piece` (X or the ids, and
dY) to the optimizer (``ROUTES``) instead of forming dW. A weight used twice in one forward (a tied
embedding and LM head) gets both pieces: its gradient is their sum, exactly; with the projected stash its
‖G_t‖² is then estimated as across micro-batches (cross terms inside the subspace). Layers that mix rows
(batch norm, packed sequences with cross-row attention) break the premise: use the dict form for those."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# id(weight) -> handler(x, dy), set only while opt.backward(row_losses, task_ids=...) runs. A module global,
# not a thread-local: autograd runs a CUDA graph's backward on its own device threads.
ROUTES: dict[int, Callable[["Piece"], None]] = {}


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
                route(LinearPiece(x, dy))  # gems stashes per-task gradients or coordinates; autograd gets none
        return gx, gw, gb, None


class RowSplitLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient GEMS can split by rows (see the module docstring). Only the class
    changes: parameters, state dict and the no-grad forward are nn.Linear's."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _LinearRows.apply(x, self.weight, self.bias, id(self.weight))
        return F.linear(x, self.weight, self.bias)


class _EmbeddingRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, key: int, padding_idx: int | None) -> Tensor:
        ctx.key, ctx.padding_idx, ctx.num = key, padding_idx, weight.shape[0]
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (ids,) = ctx.saved_tensors
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as F.embedding's backward
            dy = dy.masked_fill((ids == ctx.padding_idx).unsqueeze(-1), 0)
        route = ROUTES.get(ctx.key)
        if route is None:
            gw = torch.zeros(ctx.num, dy.shape[-1], dtype=dy.dtype, device=dy.device)
            return None, gw.index_add_(0, ids.reshape(-1), dy.reshape(-1, dy.shape[-1])), None, None
        route(EmbeddingPiece(ids, dy, ctx.num))
        return None, None, None, None


class RowSplitEmbedding(nn.Embedding):
    """``nn.Embedding`` (dense, no max_norm, no scale_grad_by_freq) whose gradient GEMS can split by rows."""

    def forward(self, ids: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _EmbeddingRows.apply(ids, self.weight, id(self.weight), self.padding_idx)
        return F.embedding(ids, self.weight, self.padding_idx)


def _splittable_embedding(m: nn.Module) -> bool:
    return type(m) is nn.Embedding and m.max_norm is None and not m.scale_grad_by_freq and not m.sparse


def convert(model: nn.Module, targeted: set[int]) -> set[int]:
    """Switch the exact ``nn.Linear`` (and plain ``nn.Embedding``) modules holding a targeted weight to their
    RowSplit classes; a tied LM head is switched with its embedding. Subclasses keep their own forward. Returns
    the ids of the targeted weights every module of which can be split."""
    users: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and id(w) in targeted and isinstance(m, (nn.Linear, nn.Embedding)):
            users.setdefault(id(w), []).append(m)
    done = set()
    for key, mods in users.items():
        for m in mods:
            if type(m) is nn.Linear:
                m.__class__ = RowSplitLinear
            elif _splittable_embedding(m):
                m.__class__ = RowSplitEmbedding
        if all(type(m) in (RowSplitLinear, RowSplitEmbedding) for m in mods):
            done.add(key)
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


def row_selectors(rows: list[list[int]], device: torch.device) -> list[slice | Tensor | None]:
    """Per task (``rows[t]``: its row indices), a slice when they are contiguous (no copy when indexing), else
    an index tensor; None for a task without rows."""
    out: list[slice | Tensor | None] = []
    for r in rows:
        if not r:
            out.append(None)
        elif r[-1] - r[0] + 1 == len(r):
            out.append(slice(r[0], r[-1] + 1))
        else:
            out.append(torch.tensor(r, dtype=torch.long, device=device))
    return out


def rows_of(t: Tensor, sel: slice | Tensor) -> Tensor:
    """The rows ``sel`` of a (batch, ..., features) activation, flattened to (tokens, features)."""
    part = t[sel] if isinstance(sel, slice) else t.index_select(0, sel)
    return part.reshape(-1, t.shape[-1])


class Piece:
    """One use of a targeted weight in the forward, as its backward sees it: ``rows`` batch rows, and the
    task gradient / coordinates of any subset of them."""

    rows: int

    def select(self, sel) -> "Piece":
        raise NotImplementedError

    def gradient(self, scale: float) -> Tensor:
        raise NotImplementedError

    def coordinates(self, basis: Tensor, side: str, scale: float) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class LinearPiece(Piece):
    """Y = X·Wᵀ: dW = dYᵀ·X (x, dy: (batch, ..., features))."""

    def __init__(self, x: Tensor, dy: Tensor):
        self.x, self.dy = x, dy
        self.rows = x.shape[0] if x.dim() >= 2 else 0

    def select(self, sel) -> "LinearPiece":
        return LinearPiece(rows_of(self.x, sel), rows_of(self.dy, sel))

    def gradient(self, scale: float) -> Tensor:
        return task_gradient(self.x, self.dy, scale)

    def coordinates(self, basis: Tensor, side: str, scale: float) -> tuple[Tensor, Tensor]:
        return task_coordinates(self.x, self.dy, basis, side, scale)


class EmbeddingPiece(Piece):
    """Y = W[ids]: dW = Σ_i e_{ids_i}·dY_iᵀ, a scatter-add of dY's rows (padding tokens already zeroed)."""

    def __init__(self, ids: Tensor, dy: Tensor, num: int):
        self.ids, self.dy, self.num = ids, dy, num
        self.rows = ids.shape[0] if ids.dim() >= 1 else 0

    def select(self, sel) -> "EmbeddingPiece":
        ids = self.ids[sel] if isinstance(sel, slice) else self.ids.index_select(0, sel)
        return EmbeddingPiece(ids.reshape(-1), rows_of(self.dy, sel), self.num)

    def gradient(self, scale: float) -> Tensor:
        g = torch.zeros(self.num, self.dy.shape[-1], dtype=torch.float32, device=self.dy.device)
        return g.index_add_(0, self.ids, self.dy.float()).mul_(scale)

    def coordinates(self, basis: Tensor, side: str, scale: float) -> tuple[Tensor, Tensor]:
        dyf = self.dy.float()
        if side == "left":  # Bᵀ·G = B[ids]ᵀ·dY
            coords = basis[self.ids].T @ dyf
        else:  # G·B = scatter-add of dY·B
            coords = torch.zeros(self.num, basis.shape[1], dtype=torch.float32, device=dyf.device)
            coords.index_add_(0, self.ids, dyf @ basis)
        uniq, inverse = torch.unique(self.ids, return_inverse=True)  # G's non-zero rows only
        rows = torch.zeros(uniq.numel(), dyf.shape[1], dtype=torch.float32, device=dyf.device).index_add_(0, inverse, dyf)
        return coords.mul_(scale), rows.square().sum() * (scale * scale)


def task_gradient(x: Tensor, dy: Tensor, scale: float) -> Tensor:
    """G_t = scale·dYᵀ·X in fp32 (x, dy: (tokens, features) rows of one task). The scale goes on the smaller
    operand: a pass over the m×n product would cost as much memory traffic as the GEMM's output."""
    if dy.numel() <= x.numel():
        dy = dy * scale
    else:
        x = x * scale
    return (dy.T @ x).float()


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


def row_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of a causal LM's batch: Σ next-token NLL over its label tokens (labels -100 are ignored) and
    the number of those tokens (an integer tensor)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    # (tokens, vocab) rows: cross_entropy over a transposed (B, V, S) view is several times slower on CPU
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=-100, reduction="none").view(shift_labels.shape)
    return nll.sum(1), (shift_labels != -100).sum(1)


def row_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Causal-LM per-row losses for ``opt.backward(losses, task_ids=..., row_weights=counts)``: each row's
    mean next-token NLL over its label tokens (0 for a row without any), and its label-token count, so that
    each task's loss is its token mean, as the plain Trainer's."""
    total, count = row_nll(logits, labels)
    return total / count.clamp_min(1), count.float()


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
    squared norm (stash="projected", and "auto"; a due weight keeps the full G_t of every task until the end
    of the backward, is refreshed there and then keeps coordinates only). Every other parameter gets the mixed gradient, kept once (not per task).
    Task t counts N_t = Σ of its rows' weights as its samples, as ``num_samples`` does in the dict form."""
    from gems import backward as dict_form
    from gems import distributed, schedule

    stash = opt._task_grads
    tasks = opt.config.tasks
    losses, weights = check_row_losses(losses, row_weights)
    idx = task_rows(task_ids, tasks, losses.numel(), losses.device)
    unsplit = [w.name for w in opt._subspaces if id(w.param) not in opt._row_split]
    if unsplit:
        raise ValueError(f"opt.backward(..., task_ids=...) splits the gradients of nn.Linear and nn.Embedding "
                         f"weights by rows; {len(unsplit)} targeted weight(s) are not (only) in plain ones of the "
                         f"model given as model= (subclasses, embeddings with max_norm/scale_grad_by_freq, or no "
                         f"model=): {', '.join(unsplit[:5])}. Use the dict form opt.backward({{task: loss}})")
    stash.begin("rows")
    n_rows = losses.numel()
    values = idx.tolist()
    rows = [[i for i, v in enumerate(values) if v == k] for k in range(len(tasks))]
    sels = row_selectors(rows, idx.device)
    w_host = weights.tolist()
    counts = [sum(w_host[i] for i in r) for r in rows]
    total = sum(counts)
    present = [k for k in range(len(tasks)) if counts[k] > 0]
    detached = (losses.detach().float() * weights).tolist()
    task_loss = {k: sum(detached[i] for i in rows[k]) / counts[k] for k in present}
    alphas = {k: stash.weight_of(tasks[k], counts[k]) for k in present}
    alpha_mix = stash.weight_of_mixed(total)
    scales = {k: total / counts[k] for k in present}
    mix = [c / total for c in counts]
    refresh_here = not distributed.should_sync(opt.config.sync) and len(present) == len(tasks)
    by_id = {id(w.param): w for w in opt._subspaces}
    due = {k for k, w in by_id.items() if schedule.due(w) and k not in stash.refreshed}
    pending = dict_form.backward_batch(opt)

    def route(piece: "Piece", w) -> None:
        key = id(w.param)
        if piece.rows != n_rows:
            raise RuntimeError(f"{w.name}: its input has {piece.rows} rows in the first (batch) dimension but "
                               f"the loss has {n_rows}: task_ids must give one task per batch row of the model's input")
        if key in stash.nonfinite:
            return
        parts = [(k, piece.select(sels[k])) for k in present]
        if opt._stash_mode == "full" or key in due:
            # full G_t; a due weight's refresh waits for the end of the backward, when every piece of a
            # weight used more than once (a tied embedding and LM head) has arrived
            for k, part in parts:
                stash.add_full(tasks[k], w.param, part.gradient(scales[k]), alpha=alphas[k])
        elif opt.config.nullspace_mode == "gradient" and w.protected is not None:  # project G_t's null-space part
            for k, part in parts:
                dict_form.stash_projected(opt, w, tasks[k], part.gradient(scales[k]), alphas[k])
        else:
            for k, part in parts:
                coords, sq = part.coordinates(w.task_bases(tasks[k]), w.side, scales[k])
                stash.add_projected(tasks[k], key, coords, sq, alphas[k])

    def refresh_due() -> None:
        """Refresh the due weights from their full gradients (accumulated over this step's micro-batches),
        then keep only their coordinates, as the per-task projected stash does."""
        for w in opt._subspaces:
            key = id(w.param)
            if key not in due or key in stash.nonfinite:
                continue
            grads = [stash.grads[t].get(key) for t in tasks]
            if any(g is None for g in grads):
                continue  # not used in this call
            for t in tasks:
                del stash.grads[t][key]
            item = schedule.backward_job(opt, w, grads, mix)
            if item is not None:
                pending.add(item, w.param.device)

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
    ROUTES.update({id(w.param): (lambda piece, w=w: route(piece, w)) for w in opt._subspaces})
    try:
        mean = (losses * (weights / total)).sum()
        torch.autograd.backward(mean, retain_graph=retain_graph)
        if opt._stash_mode == "projected" and refresh_here:
            refresh_due()
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
