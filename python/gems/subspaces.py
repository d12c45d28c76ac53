"""One targeted weight's subspaces: ranks, bases, and the coordinate tensors the inner optimizer updates."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gems import nullspace as nsp
from gems import reference
from gems.refresh import canonical_signs, compute_bases, orthonormalize_against_many

SHARED = "shared"
# Bytes of pending shared gradients after which the optimizer refreshes the weights collected so far in one
# batched call (same-shape weights share every GEMM, CholeskyQR and small-SVD call). On CUDA a refresh of a
# small weight is latency-bound: 576×1536 rank 128 took 3.3–4.1 ms alone on an H100 (svd: 24–26 ms), 0.42 ms
# per weight in a batch of 30 (benches/results/refresh_nvidia_h100_80gb_hbm3.md). The cap bounds the extra
# memory to a few times itself (the pending shared gradients, one task's residuals and a stacked copy); the
# batch is flushed when the pending bytes reach it, the weight that crosses it included (19 such weights).
# On CPU a call has no such fixed cost, so weights are refreshed one by one (no extra memory).
REFRESH_BATCH_BYTES = {"cuda": 64 << 20}
# inner-optimizer state entries that hold squared gradients (torch Adam/AdamW, RMSprop, Adagrad)
SECOND_ORDER_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


@dataclass
class WeightSubspaces:
    """GEMS state of one weight W (m×n).

    ``coords[s]`` is a zero fp32 tensor handed to the inner optimizer as a parameter; each step its
    gradient is the projected gradient and its value after the inner step is the update δ in that subspace
    (then it is zeroed again, so the inner optimizer's own weight decay acts on zero: gems owns decay)."""

    index: int
    name: str
    param: Tensor
    side: str
    ranks: dict[str, int]
    coords: dict[str, Tensor] = field(default_factory=dict)
    bases: dict[str, Tensor | None] = field(default_factory=dict)
    step: int = 0
    group: dict | None = None  # the inner param group the weight came from (lr, weight_decay)
    protected: Tensor | None = None  # null-space basis Q of this weight (fp32), if any
    protect_side: str = "input"
    # Bases actually used to project and map back: the null-space projector folded in where it acts on
    # the basis side (B' = (I − QQᵀ)B, not orthonormal); ``delta_projector`` is Q when it acts on the
    # other side, and then every coordinate update δ is projected instead (same result, r-sized cost).
    work_bases: dict[str, Tensor] = field(default_factory=dict)
    delta_projector: Tensor | None = None
    next_refresh: int = 0  # step at which the bases are recomputed next
    gap_factor: int = 1  # adaptive refresh: the gap is stretched while the shared basis barely moves

    @classmethod
    def create(cls, index: int, name: str, param: Tensor, *, tasks, rank: int, task_rank: int, proj_type: str,
               task_basis: str) -> "WeightSubspaces":
        if param.dim() != 2:
            raise ValueError(f"{name}: GEMS projects 2-D weights only, got shape {tuple(param.shape)}")
        side = reference.side_for(param.shape, proj_type)
        r_sh, r_t = reference.clamped_ranks(param.shape, side, rank, task_rank, task_basis)
        ranks = {SHARED: r_sh, **{t: r_t for t in tasks}}
        ws = cls(index=index, name=name, param=param, side=side, ranks=ranks)
        for s, r in ranks.items():
            ws.bases[s] = None
            if r > 0:
                ws.coords[s] = torch.zeros(0, dtype=torch.float32, device=param.device)
        return ws

    def coord_shape(self, s: str) -> tuple[int, int]:
        return reference.coord_shape(self.param.shape, self.side, self.ranks[s])

    def coord_numel(self) -> int:
        return sum(math.prod(self.coord_shape(s)) for s in self.coords)

    def materialize_coords(self, storage: Tensor) -> None:
        """Give every coordinate tensor its zero storage for the inner step: consecutive views of ``storage``
        (``coord_numel()`` zero fp32 elements, a slice of a buffer the step fills once for all weights).
        Between steps they hold no memory (their value is zero by construction), so only moments and bases
        persist."""
        off = 0
        for s, c in self.coords.items():
            shape = self.coord_shape(s)
            n = math.prod(shape)
            c.data = storage[off:off + n].view(shape)
            off += n

    def release_coords(self) -> None:
        for c in self.coords.values():
            c.grad = None
            if c.numel():  # the fused path never materialises them: no new empty tensor per step
                c.data = torch.empty(0, dtype=torch.float32, device=self.param.device)

    def fold_nullspace(self, mode: str) -> None:
        """Recompute ``work_bases`` from ``bases`` and the protected basis (after a refresh or a load)."""
        self.delta_projector = None
        q = self.protected if mode == "update" else None
        for s in self.subspaces():
            b = self.bases[s]
            folded = nsp.fold_into_basis(b, q, self.side, self.protect_side) if q is not None else b
            if folded is None:
                folded, self.delta_projector = b, q
            self.work_bases[s] = folded

    def subspaces(self) -> list[str]:
        """Subspaces with a positive rank, shared first then tasks in order."""
        return [s for s, r in self.ranks.items() if r > 0]

    def task_bases(self, task: str) -> Tensor:
        """[B_sh, B_t] (work bases): one projection of task t's gradient gives its shared and task coordinates."""
        return torch.cat([self.work_bases[SHARED], self.work_bases[task]], dim=1) if self.ranks[task] \
            else self.work_bases[SHARED]

    def split_coords(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """Coordinates against [B_sh, B_t] → (shared part, task part)."""
        r_sh = self.ranks[SHARED]
        return (coords[:r_sh], coords[r_sh:]) if self.side == "left" else (coords[:, :r_sh], coords[:, r_sh:])

    def basis_similarity(self, old: dict[str, Tensor | None]) -> float:
        """‖B_oldᵀ B_new‖²_F / r of the shared subspace: 1 when the span did not move, ~r/d when random."""
        prev, new = old.get(SHARED), self.bases[SHARED]
        if prev is None or new.shape[1] == 0:
            return 0.0
        return float((prev.T @ new).pow(2).sum()) / new.shape[1]

    def transfer_state(self, old: dict[str, Tensor | None], state: dict, mode: str) -> None:
        """Carry the inner optimizer's per-coordinate state into the new bases.

        ``keep``: leave it as is (GaLore: moments of the old coordinates are reused as they are).
        ``reset``: drop it (the inner optimizer restarts, bias correction included).
        ``rotate``: map coordinates by R = B_newᵀ·B_old: first-order tensors (same shape as the coordinates,
        e.g. exp_avg, momentum_buffer) by R, second-order ones (exp_avg_sq, square_avg, sum) by R∘R, which
        keeps them non-negative. Tensors of other shapes (steps, factored Adafactor rows) are kept."""
        if mode == "keep":
            return
        for s in self.subspaces():
            c = self.coords[s]
            st = state.get(c)
            if not st:
                continue
            if mode == "reset" or old.get(s) is None:
                state[c] = {}
                continue
            rot = self.bases[s].T @ old[s]
            shape = self.coord_shape(s)
            for key, value in list(st.items()):
                if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                    continue
                st[key] = reference.rotate_moment(value, rot, self.side, second_order=key in SECOND_ORDER_STATE)


@dataclass
class RefreshJob:
    """One weight due for new bases: this step's shared and per-task gradients and the weight's generator."""

    w: WeightSubspaces
    shared: Tensor
    tasks: dict[str, Tensor]
    generator: torch.Generator

    def nbytes(self) -> int:
        return self.shared.numel() * self.shared.element_size()


def batch_bytes(device: torch.device) -> int:
    """How many bytes of refresh jobs to collect before refreshing them together (REFRESH_BATCH_BYTES)."""
    return REFRESH_BATCH_BYTES.get(device.type, 0)


class RefreshBatch:
    """Collects the weights due for a refresh and hands them to ``flush`` together, each time they hold
    REFRESH_BATCH_BYTES of their device's memory (the item that crosses the cap included; on CPU, at once)
    and once more at :meth:`finish`. One rule for ``step()`` and for the projected stash's backward hooks,
    which differ only in what an item is and what a flush does; ``nbytes`` sizes an item."""

    def __init__(self, flush: Callable[[list], None], nbytes: Callable[[Any], int]):
        self._flush, self._nbytes = flush, nbytes
        self.items: list = []
        self._bytes = 0

    def add(self, item, device: torch.device) -> None:
        self.items.append(item)
        self._bytes += self._nbytes(item)
        if self._bytes >= batch_bytes(device):
            self.finish()

    def finish(self) -> None:
        """Flush what is pending (``flush`` gets the list and may empty it to free what its items hold)."""
        items, self.items, self._bytes = self.items, [], 0
        if items:
            self._flush(items)


def refresh_bases(jobs: list[RefreshJob], *, task_basis: str, method: str,
                  warm_start: bool = False, basis_signs: str = "canonical") -> list[dict[str, Tensor]]:
    """New bases for every job's weight from its gradients: B_sh from the shared gradient, B_t from G_t
    (residual mode: from the part of G_t outside span(B_sh), orthonormalised against B_sh). Returns them
    per job; nothing is assigned, so a failure leaves every weight's bases as they were.

    All jobs are refreshed together (same-shape weights batched by compute_bases, each with its own
    generator, so every weight gets the bases it would get alone up to rounding; "svd" bit for bit).

    ``basis_signs="canonical"`` gives every column the sign that makes its largest entry positive (the
    iterative engines and the residual orthonormalisation always do): an SVD solver's signs are arbitrary
    and can flip between refreshes, which points moments kept across the refresh (state_transfer="keep")
    the wrong way. ``"solver"`` keeps svd's own signs, as galore-torch does (bit-for-bit GaLore)."""
    news: list[dict[str, Tensor]] = [{} for _ in jobs]

    def bases_for(items: list[tuple[int, str, Tensor]]) -> None:
        groups: dict[tuple[int, str], list[int]] = {}
        for k, (i, s, _) in enumerate(items):
            groups.setdefault((jobs[i].w.ranks[s], jobs[i].w.side), []).append(k)
        for (rank, side), ks in groups.items():
            got = compute_bases([items[k][2] for k in ks], rank, side, method=method,
                                # warm start: the iterative engines start from the bases being replaced
                                previous=[jobs[items[k][0]].w.bases.get(items[k][1]) if warm_start else None
                                          for k in ks],
                                generator=[jobs[items[k][0]].generator for k in ks])
            if method == "svd" and basis_signs == "canonical":
                got = [canonical_signs(b) for b in got]
            for k, b in zip(ks, got):
                i, s, _ = items[k]
                news[i][s] = b

    bases_for([(i, SHARED, j.shared) for i, j in enumerate(jobs)])
    for t in (jobs[0].tasks if jobs else {}):
        todo = [i for i, j in enumerate(jobs) if j.w.ranks[t] > 0]
        grads = [jobs[i].tasks[t].float() for i in todo]
        if task_basis == "residual":
            grads = [reference.remove_component(g, news[i][SHARED], jobs[i].w.side) for i, g in zip(todo, grads)]
        bases_for([(i, t, g) for i, g in zip(todo, grads)])
        del grads
        if task_basis == "residual":
            got = orthonormalize_against_many([news[i][t] for i in todo], [news[i][SHARED] for i in todo],
                                              [jobs[i].generator for i in todo])
            for i, b in zip(todo, got):
                news[i][t] = b
    return news


def clamp_report(subspaces: list[WeightSubspaces], rank: int, task_rank: int) -> None:
    """Warn once about every weight whose ranks were cut to fit the matrix."""
    cut = [f"{w.name} {tuple(w.param.shape)}: shared {w.ranks[SHARED]}"
           + ("" if len(w.ranks) == 1 else f", task {next(r for s, r in w.ranks.items() if s != SHARED)}")
           for w in subspaces
           if w.ranks[SHARED] < rank or any(r < task_rank for s, r in w.ranks.items() if s != SHARED)]
    if cut:
        warnings.warn(f"GEMS ranks clamped to fit the matrices (rank={rank}, task_rank={task_rank}): "
                      + "; ".join(cut[:10]) + (f" and {len(cut) - 10} more" if len(cut) > 10 else ""),
                      stacklevel=3)
