"""Glue shared by the Triton launchers: mode detection, the device rule, pointer tables, block sizes.

The operands are checked by gems.contract (one checker per contract, shared with the CUDA backend); this
module holds what only the Triton launchers need: the device rule they hand it, the int32 extent limit,
the memo of checked operands (:data:`CHECKED`) and the pointer tables.

Batching across weights uses **pointer tables** (as Triton's grouped-GEMM tutorial does): the launcher
writes the addresses of every gradient, basis, moment and δ tensor into one small int64 tensor, and each
program loads the address it needs and casts it with ``.to(tl.pointer_type(...))``. Checked to work both
compiled and under ``TRITON_INTERPRET=1``. Cost: no copy of any gradient/weight (a stacked copy would add
a full extra read and write of every m×n tensor, more than the kernel's own traffic), one host→device copy
of a few hundred bytes when a table is first built; tables are cached by the addresses they hold, so an
optimizer that keeps its buffers pays it once per refresh, not per step. Limits: every tensor reached
through a table must be contiguous (the launchers copy non-contiguous ones and copy outputs back), and
offsets inside one tensor are int32 (m·n < 2³¹, checked).
"""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch

# Decided once, when the kernels are decorated: triton.jit picks the interpreter at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_INT32_MAX = 2**31 - 1

# fp32 operands on a GPU: 3xTF32 keeps ~fp32 accuracy (the 2x-of-torch-fp32 test rule) on tensor cores;
# plain "tf32" would be ~1e-3 relative and fail it, "ieee" is exact but runs on the FMA units.
FP32_DOT_PRECISION = "tf32x3"


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for tl.dot whose operands are cast to ``dtype`` (only matters for fp32)."""
    if INTERPRET:
        return "ieee"
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def check_device(device: torch.device, what: str) -> None:
    """The Triton backend's device rule (gems.contract's ``device_rule``): the one device of a call's operands."""
    if INTERPRET:
        if device.type != "cpu":
            raise ValueError(f"{what}: TRITON_INTERPRET=1 runs the kernels on CPU tensors only, got {device}")
    elif device.type != "cuda":
        raise ValueError(f"{what}: the compiled Triton kernels need CUDA tensors, got {device} "
                         "(set TRITON_INTERPRET=1 before importing gems_kernels to run them on CPU)")


def contiguous_rows(rows: list[list[torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Replace every non-contiguous ``rows[k][i]`` by a contiguous copy, in place; returns the (original, copy)
    pairs, for in-place outputs to be copied back after the launch (empty when nothing was copied)."""
    copies = []
    for row in rows:
        for i, t in enumerate(row):
            if not t.is_contiguous():
                row[i] = t.contiguous()
                copies.append((t, row[i]))
    return copies


def flatten(nested: Sequence[Sequence]) -> list:
    """list[K] of list[S] → the K·S items row by row (the order of the launchers' pointer tables)."""
    return [x for row in nested for x in row]


def check_int32_extent(numel: int, what: str) -> None:
    if numel > _INT32_MAX:
        raise ValueError(f"{what} has {numel} elements; the kernels index with int32 offsets (< 2^31)")


class _TableCache:
    """Small LRU of device tensors built from host values; keyed by those values, so never stale."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._d: OrderedDict = OrderedDict()

    def get(self, key, values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        full_key = (str(device), dtype, key)
        hit = self._d.get(full_key)
        if hit is not None:
            self._d.move_to_end(full_key)
            return hit
        t = torch.tensor(list(values), dtype=dtype, device=device)
        self._d[full_key] = t
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return t

    def clear(self) -> None:
        self._d.clear()


TABLES = _TableCache()


def ptr_table(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 tensor of the tensors' addresses (an empty tensor's address is never dereferenced)."""
    ptrs = tuple(int(t.data_ptr()) for t in tensors)
    return TABLES.get(("ptr",) + ptrs, ptrs, torch.int64, device)


def int_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    vals = tuple(int(v) for v in values)
    return TABLES.get(("i32",) + vals, vals, torch.int32, device)


def float_table(values: Sequence[float], device: torch.device) -> torch.Tensor:
    vals = tuple(float(v) for v in values)
    return TABLES.get(("f32",) + vals, vals, torch.float32, device)


class CheckedOperands:
    """Memo of a launcher's per-tensor boundary checks on operands that persist across calls.

    An optimizer hands the same bases, moments and weights to every launch between two refreshes; checking
    each of them again (shape, dtype, device, contiguity) and rebuilding their pointer tables costs more than
    confirming they are the tensors already checked (`python benches/bench_overhead.py --backends triton
    --stub-kernels`, rows gems-recheck / gems).

    A record holds weak references to the checked tensors with each one's address, shape, dtype and device
    (all contiguous: others are never recorded). It is reused only for the very same tensor objects with all
    of those unchanged and still contiguous, so a hit is what a full check would have accepted: a replaced or
    freed tensor fails the identity test (a dead weak reference never matches), and ``.data =``, ``set_``,
    ``resize_`` or ``as_strided_`` on a checked tensor change one of the others. Records whose tensors are
    gone (bases replaced at a refresh) are dropped when the next record is stored."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._d: OrderedDict = OrderedDict()

    @staticmethod
    def _layout(tensors: Sequence[torch.Tensor]) -> tuple[list, list, list, list]:
        # only contiguous operands are recorded, so contiguity plus shape stands for the strides; none of
        # these allocates a container per tensor (a stride tuple each made Python's garbage collector run
        # often enough to cost more than the checks saved)
        return ([t.data_ptr() for t in tensors], [t.shape for t in tensors], [t.dtype for t in tensors],
                [t.get_device() for t in tensors])

    def get(self, key, tensors: Sequence[torch.Tensor]):
        """The value stored for ``key`` if it was stored for exactly these tensors, unchanged, else None."""
        rec = self._d.get(key)
        if rec is None:
            return None
        refs, layout, value = rec
        if len(refs) != len(tensors) or any(r() is not t for r, t in zip(refs, tensors)):
            return None
        ptrs, shapes, dtypes, devices = layout  # compared one list at a time
        if ([t.data_ptr() for t in tensors] != ptrs or not all(t.is_contiguous() for t in tensors)
                or [t.shape for t in tensors] != shapes or [t.dtype for t in tensors] != dtypes
                or [t.get_device() for t in tensors] != devices):
            return None
        self._d.move_to_end(key)
        return value

    def put(self, key, tensors: Sequence[torch.Tensor], value) -> None:
        if self.capacity <= 0:  # memo off
            return
        for dead in [k for k, (refs, _, _) in self._d.items() if refs and refs[0]() is None]:
            del self._d[dead]
        self._d[key] = ([weakref.ref(t) for t in tensors], self._layout(tensors), value)
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()


CHECKED = CheckedOperands()


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def clamp_block(dim: int, lo: int, hi: int) -> int:
    """Power-of-two block covering ``dim`` if small, clamped to [lo, hi] (tl.dot needs ≥ 16)."""
    return max(lo, min(hi, next_pow2(max(dim, 1))))
