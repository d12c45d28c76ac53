"""Null-space projection: keep the updates of protected weights out of a "general-knowledge" subspace.

Conventions (a weight ``W`` is m×n, as ``nn.Linear.weight``: m = out_features, n = in_features):

- ``side="input"``: the protected basis ``Q`` (n×k, orthonormal columns) spans the principal directions of
  the layer's *inputs* x over a general corpus. An update is in the null space when ``ΔW·Q = 0``, so
  ``ΔW·x ≈ 0`` for general inputs (AlphaEdit, LoRA-Null, CorDA). The projector acts on the right:
  ``ΔW ← ΔW·(I − QQᵀ)``.
- ``side="output"``: ``Q`` (m×k) spans the principal directions of the layer's *outputs* (the authors'
  code); an update is in the null space when ``Qᵀ·ΔW = 0``; the projector acts on the left.
- ``side="weight"``: data-free, ``Q`` = top right singular vectors of the pre-trained weight (MiLoRA/OSF
  style); it lives in the input space and behaves exactly like ``"input"``.

The pure functions at the bottom (:func:`fold_into_basis`, :func:`project_update`,
:func:`project_gradient`, :func:`leakage`) are what :class:`gems.GemsOptimizer` calls; they take the
protected side (``"input"``/``"weight"``/``"output"``) and, for the fold, the side of the GaLore basis
(``"left"``: m×r, ``"right"``: n×r, as in :mod:`gems.reference`).

Calibration (:meth:`NullSpace.calibrate`) is in :mod:`gems.calibration`, the file format (:meth:`NullSpace.save`,
:meth:`NullSpace.load`) in :mod:`gems.nullspace_io`; their public names are importable from here too.

Example (runs as a test)::

    >>> import torch
    >>> from torch import nn
    >>> from gems.nullspace import NullSpace, project_update, leakage
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> span = torch.linalg.qr(torch.randn(16, 3))[0]          # general inputs live in 3 dimensions
    >>> batches = [torch.randn(32, 3) @ span.T for _ in range(4)]
    >>> ns = NullSpace.calibrate(model, batches, side="input", threshold=2e-2)
    >>> ns.report()["0"]["protected_dim"], ns.report()["0"]["status"]
    (3, 'partial')
    >>> delta = project_update(torch.randn(8, 16), ns.basis("0"), ns.protect_side)
    >>> leakage(delta, ns.basis("0"), ns.protect_side) < 1e-6
    True
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gems import calibration, nullspace_io
from gems.calibration import MODES, PROTECT_SIDES, TargetFilter, resolve_targets, select_rank  # noqa: F401
from gems.errors import GemsError
from gems.nullspace_io import FORMAT_NAME, FORMAT_VERSION, NullSpaceFormatError  # noqa: F401
from gems.refresh import orthonormality_errors
from gems.targets import unwrap

logger = logging.getLogger(__name__)

# max |QᵀQ − I| accepted for a protected basis (given or loaded): fp32 eigenvectors reach ~1e-6
ORTHONORMAL_TOL = 1e-4

__all__ = [
    "NullSpace",
    "NullSpaceFormatError",
    "IncompatibleNullSpaceError",
    "select_rank",
    "resolve_targets",
    "fold_into_basis",
    "project_update",
    "project_gradient",
    "leakage",
    "acts_on",
]


class IncompatibleNullSpaceError(GemsError, ValueError):
    """A null space does not fit a model: a module is missing or its weight has another shape."""


def orthonormality_error(q: Tensor) -> float:
    """max |QᵀQ − I| in fp64 (0 for a basis without columns): the one orthonormality measure, for null-space
    bases and for the subspace bases of a checkpoint alike (each with its own tolerance)."""
    return 0.0 if q.shape[1] == 0 else float(orthonormality_errors(q.unsqueeze(0))[0])


def _status(k: int, d: int) -> str:
    return "empty" if k == 0 else ("full" if k == d else "partial")


# --------------------------------------------------------------------------------------------------
# NullSpace
# --------------------------------------------------------------------------------------------------


class NullSpace:
    """Protected bases ``Q`` (d×k, orthonormal columns, fp32), one per module, and what they came from.

    Build with :meth:`calibrate` (or :meth:`load`); or directly from a ``{name: Q}`` mapping of module names
    to orthonormal d×k bases (checked unless ``check=False``). A module whose
    ``Q`` has 0 columns protects nothing (its updates are unconstrained); one with ``k = d`` cannot move.
    """

    def __init__(
        self,
        bases: Mapping[str, Tensor],
        *,
        side: str = "input",
        threshold: float | None = None,
        mode: str | None = None,
        spectra: Mapping[str, Tensor] | None = None,
        samples: Mapping[str, int] | None = None,
        shapes: Mapping[str, Sequence[int]] | None = None,
        accumulate_dtype: str | None = None,
        check: bool = True,
    ):
        if side not in PROTECT_SIDES:
            raise ValueError(f"side must be one of {PROTECT_SIDES}, got {side!r}")
        self._side = side
        self.threshold = threshold
        self.mode = mode
        self.accumulate_dtype = accumulate_dtype
        self._bases: dict[str, Tensor] = {}
        for name, q in bases.items():
            if not isinstance(q, Tensor) or q.dim() != 2:
                raise ValueError(f"basis of {name!r} must be a 2-D tensor (d×k), got "
                                 f"{getattr(q, 'shape', type(q))}")
            if q.shape[1] > q.shape[0]:
                raise ValueError(f"basis of {name!r} has more columns than rows: {tuple(q.shape)}")
            q = q.detach().to(torch.float32).contiguous()
            problem = self._basis_problem(q) if check else None
            if problem:
                raise ValueError(f"basis of {name!r} {problem}")
            self._bases[name] = q
        self._spectra = {k: v.detach().to(torch.float64).cpu() for k, v in (spectra or {}).items()}
        self._samples = {k: int(v) for k, v in (samples or {}).items()}
        self._shapes = {k: tuple(int(s) for s in v) for k, v in (shapes or {}).items()}

    # ---- accessors -------------------------------------------------------------------------------
    @property
    def side(self) -> str:
        """``"input"``, ``"output"`` or ``"weight"`` (the last behaves as ``"input"``)."""
        return self._side

    @property
    def protect_side(self) -> str:
        """``"input"`` or ``"output"``: the side the projector acts on (``"weight"`` maps to ``"input"``)."""
        return "output" if self._side == "output" else "input"

    @property
    def modules(self) -> list[str]:
        return list(self._bases)

    def __contains__(self, name: object) -> bool:
        return name in self._bases

    def __len__(self) -> int:
        return len(self._bases)

    def __repr__(self) -> str:
        rep = self.report()
        counts = {s: sum(1 for r in rep.values() if r["status"] == s) for s in ("partial", "empty", "full")}
        return (f"NullSpace(side={self._side!r}, mode={self.mode!r}, threshold={self.threshold!r}, "
                f"modules={len(self)}, partial={counts['partial']}, empty={counts['empty']}, full={counts['full']})")

    def _get(self, name: str) -> Tensor:
        try:
            return self._bases[name]
        except KeyError:
            raise KeyError(f"no null space for module {name!r} (known: {len(self._bases)} modules)") from None

    def basis(self, name: str) -> Tensor | None:
        """Protected basis Q (d×k fp32) of ``name``; ``None`` when it protects nothing (k = 0).
        Raises ``KeyError`` for a module that was not calibrated (test with ``name in ns``)."""
        q = self._get(name)
        return None if q.shape[1] == 0 else q

    def projector(self, name: str) -> Tensor:
        """P = I − QQᵀ (d×d, fp32) of ``name``: the orthogonal projector onto its null space."""
        q = self._get(name)
        eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
        return eye if q.shape[1] == 0 else eye - q @ q.T

    def spectrum(self, name: str) -> Tensor | None:
        """The calibration spectrum (descending, fp64) the threshold was applied to, if known: eigenvalues
        of the activation covariance, or singular values of the weight for ``side="weight"``."""
        self._get(name)
        return self._spectra.get(name)

    def to(self, device: torch.device | str) -> "NullSpace":
        """Moves every basis to ``device`` (in place) and returns ``self``."""
        self._bases = {k: v.to(device) for k, v in self._bases.items()}
        return self

    def report(self) -> dict[str, dict[str, Any]]:
        """``{name: {"protected_dim", "total_dim", "status", "samples"}}`` with status ``"empty"``
        (nothing protected: updates unconstrained), ``"full"`` (everything protected: the layer cannot
        move) or ``"partial"``."""
        out = {}
        for name, q in self._bases.items():
            d, k = int(q.shape[0]), int(q.shape[1])
            out[name] = {"protected_dim": k, "total_dim": d, "status": _status(k, d),
                         "samples": self._samples.get(name, 0)}
        return out

    def _warn_degenerate(self) -> None:
        rep = self.report()
        empty = [n for n, r in rep.items() if r["status"] == "empty"]
        full = [n for n, r in rep.items() if r["status"] == "full"]
        if empty:
            logger.warning("null space protects nothing (updates unconstrained) for %d module(s): %s",
                           len(empty), ", ".join(empty))
        if full:
            logger.warning("null space protects every direction (the layer cannot move) for %d module(s): %s",
                           len(full), ", ".join(full))

    @staticmethod  # on the class: gems.nullspace_io checks the bases it loads with it
    def _basis_problem(q: Tensor) -> str | None:
        """Why the d×k basis ``q`` cannot protect anything (non-finite, not orthonormal), or ``None``."""
        if q.shape[1] == 0:
            return None
        if not bool(torch.isfinite(q).all()):
            return "has non-finite entries (NaN or Inf)"
        err = orthonormality_error(q)
        if not err <= ORTHONORMAL_TOL:
            return f"must have orthonormal columns (max |QᵀQ − I| = {err:.2e} > {ORTHONORMAL_TOL:g})"
        return None

    # ---- calibration -----------------------------------------------------------------------------
    @classmethod
    def calibrate(
        cls,
        model: nn.Module,
        batches: Iterable[Any] | None,
        *,
        side: str = "input",
        threshold: float = 2e-2,
        mode: str = "absolute",
        target_modules: TargetFilter = None,
        dtype: torch.dtype = torch.float64,
        max_batches: int | None = None,
    ) -> "NullSpace":
        """Protected bases of ``model``'s target ``nn.Linear`` modules.

        ``side="input"``/``"output"``: forward hooks accumulate the uncentred covariance C = Σ x xᵀ / N of
        each module's inputs / outputs (outputs as the module returns them, bias included) over
        ``batches``, streaming in ``dtype``; all leading dimensions are flattened, and when a batch is a
        dict with ``attention_mask`` padded positions are left out. A batch is a tensor (``model(batch)``),
        a dict (``model(**batch)``) or a tuple/list (``model(*batch)``); tensors are moved to the model's
        device. Runs under ``torch.no_grad``; the training mode is restored and the hooks are removed
        whatever happens. C is eigendecomposed in fp64 and the leading eigenvectors are kept by ``mode``:
        ``"absolute"`` eigenvalue > threshold (the authors' 2e-2), ``"energy"`` the smallest k holding
        ``threshold`` of the trace, ``"topk"`` k = int(threshold).

        ``side="weight"``: data-free (``batches`` is ignored and may be ``None``); Q = top right singular
        vectors of each weight; ``"absolute"`` compares singular values to the threshold, ``"energy"``
        uses their squares, ``"topk"`` the count.

        Raises ``ValueError`` naming the module when its activations (or, for ``"weight"``, its weight)
        were not finite.
        """
        return calibration.calibrate(cls, model, batches, side=side, threshold=threshold, mode=mode,
                                     target_modules=target_modules, dtype=dtype, max_batches=max_batches)

    # ---- compatibility ---------------------------------------------------------------------------
    def check_compatible(self, model: nn.Module) -> None:
        """Raises :class:`IncompatibleNullSpaceError` naming the first module that is missing from ``model``,
        is not an ``nn.Linear``, or whose weight shape differs from the one calibrated."""
        mods = dict(unwrap(model).named_modules())
        for name, q in self._bases.items():
            mod = mods.get(name)
            if mod is None:
                raise IncompatibleNullSpaceError(f"null-space module {name!r} is missing from the model")
            w = getattr(mod, "weight", None)
            if not isinstance(mod, nn.Linear) or w is None:
                raise IncompatibleNullSpaceError(f"null-space module {name!r} is a {type(mod).__name__}, "
                                                 f"not an nn.Linear")
            shape = tuple(w.shape)
            want = self._shapes.get(name)
            if want is not None and shape != want:
                raise IncompatibleNullSpaceError(f"null-space module {name!r}: model weight is {shape}, "
                                                 f"null space was calibrated on {want}")
            dim = shape[0] if self.protect_side == "output" else shape[1]
            if q.shape[0] != dim:
                raise IncompatibleNullSpaceError(f"null-space module {name!r}: basis has {q.shape[0]} rows, "
                                                 f"the model weight {shape} needs {dim} on the "
                                                 f"{self.protect_side} side")

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Writes a safetensors file (bases keyed by module name, spectra under ``__spectrum__.<name>``,
        JSON metadata) atomically: a temporary file in the same folder, then ``os.replace``."""
        return nullspace_io.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> "NullSpace":
        """Reads a file written by :meth:`save`. Raises :class:`gems.errors.MissingResourceError` (a
        ``FileNotFoundError``) for a missing file and :class:`NullSpaceFormatError` for anything else wrong."""
        return nullspace_io.load(cls, path, device=device)


# --------------------------------------------------------------------------------------------------
# pure functions the optimizer calls
# --------------------------------------------------------------------------------------------------


def acts_on(protect_side: str) -> str:
    """The GaLore basis side (``"left"``/``"right"``) the projector of ``protect_side`` acts on:
    ``"input"``/``"weight"`` → ``"right"`` (ΔW·P), ``"output"`` → ``"left"`` (P·ΔW)."""
    if protect_side in ("input", "weight"):
        return "right"
    if protect_side == "output":
        return "left"
    raise ValueError(f"protect_side must be one of {PROTECT_SIDES}, got {protect_side!r}")


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _empty(q: Tensor | None) -> bool:
    return q is None or q.shape[1] == 0


def fold_into_basis(basis: Tensor, Q: Tensor | None, basis_side: str, protect_side: str) -> Tensor | None:
    """Folds the null-space projector into a subspace basis, once per refresh.

    When the projector acts on the basis side (protect ``"input"``/``"weight"`` with a ``"right"`` basis,
    or ``"output"`` with a ``"left"`` basis) returns B' = (I − QQᵀ)·B (computed twice, "twice is enough",
    in at least fp32, returned in ``basis``' dtype). Any update built from it, B'·δ or δ·B'ᵀ, lies in the
    null space exactly (to rounding), at zero per-step cost. Returns ``None`` when the sides differ: then
    the optimizer must :func:`project_update` every step. With no protection (``Q`` None or k = 0) the
    basis is returned unchanged.

    B' is deliberately **not** re-orthonormalised:
    - with B' used both to project (R = Gᵀ-side product with B') and to map back (Δ = B'·δ), the
      coordinates are an honest parametrisation ΔW = B'δ and R is exactly the gradient of the loss with
      respect to δ (chain rule), and Δ = P·(Bδ), the same update :func:`project_update` would give;
    - column j of B' stays the null-space part of column j of B, so optimizer moments keep their meaning
      column by column across the fold;
    - a direction mostly inside the protected space keeps a short column and therefore moves little;
      re-orthonormalising would blow its small residual up to unit length (amplifying whatever noise
      is left), is ill-conditioned when P·B is nearly rank-deficient, and needs random fill-ins when the
      null space has fewer than r dimensions.
    Consequence for callers: B' is not orthonormal, so use it with ``reference.project`` /
    ``reference.project_back`` (valid for any matrix) but never with ``reference.remove_component`` or
    ``orthonormalize_against``; build residual task bases from the unfolded bases, then fold each.
    """
    if basis_side not in ("left", "right"):
        raise ValueError(f"basis_side must be 'left' or 'right', got {basis_side!r}")
    if acts_on(protect_side) != basis_side:
        return None
    if _empty(Q):
        return basis
    if Q.shape[0] != basis.shape[0]:
        raise ValueError(f"null-space basis has {Q.shape[0]} rows, subspace basis has {basis.shape[0]}")
    work = _work_dtype(basis)
    b = basis.to(work)
    q = Q.to(device=b.device, dtype=work)
    for _ in range(2):
        b = b - q @ (q.T @ b)
    return b.to(basis.dtype)


def project_update(delta: Tensor, Q: Tensor | None, protect_side: str) -> Tensor:
    """The null-space part of an update: ΔW·(I − QQᵀ) (``"input"``/``"weight"``) or (I − QQᵀ)·ΔW
    (``"output"``). Computed in at least fp32, returned in ``delta``'s dtype (a cast to bf16 re-introduces
    rounding-level leakage). ``Q`` None or with 0 columns: returns ``delta`` unchanged."""
    side = acts_on(protect_side)
    if _empty(Q):
        return delta
    work = _work_dtype(delta)
    d = delta.to(work)
    q = Q.to(device=d.device, dtype=work)
    out = d - (d @ q) @ q.T if side == "right" else d - q @ (q.T @ d)
    return out.to(delta.dtype)


def project_gradient(grad: Tensor, Q: Tensor | None, protect_side: str) -> Tensor:
    """The authors' scheme (``nullspace_mode="gradient"``): project the raw gradient, G·(I − QQᵀ) or
    (I − QQᵀ)·G, before the SVD and the inner optimizer. Same math as :func:`project_update`; it does
    **not** keep the final update in the null space once an optimizer rescales coordinates elementwise
    (Adam), which is why gems' default projects the update instead."""
    return project_update(grad, Q, protect_side)


def leakage(delta: Tensor, Q: Tensor | None, protect_side: str, *, dtype: torch.dtype = torch.float64) -> float:
    """‖ΔW·Q‖/‖ΔW‖ (``"input"``/``"weight"``) or ‖QᵀΔW‖/‖ΔW‖ (``"output"``), Frobenius norms, measured in
    ``dtype`` (fp64 by default so the measurement adds no error of its own). 0.0 for a zero update or no
    protection."""
    side = acts_on(protect_side)
    if _empty(Q):
        return 0.0
    d = delta.to(dtype)
    norm = float(torch.linalg.norm(d))
    if norm == 0.0:
        return 0.0
    q = Q.to(device=d.device, dtype=dtype)
    inside = d @ q if side == "right" else q.T @ d
    return float(torch.linalg.norm(inside)) / norm
