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

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from gems.errors import GemsError, MissingResourceError
from gems.refresh import orthonormality_errors
from gems.targets import select_linear_modules, unwrap

logger = logging.getLogger(__name__)

FORMAT_NAME = "gems.nullspace"
FORMAT_VERSION = 1
PROTECT_SIDES = ("input", "output", "weight")
MODES = ("absolute", "energy", "topk")
_SPECTRUM_PREFIX = "__spectrum__."
# max |QᵀQ − I| accepted for a protected basis (given or loaded): fp32 eigenvectors reach ~1e-6
ORTHONORMAL_TOL = 1e-4

TargetFilter = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]  # = gems.targets.TargetSpec

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


class NullSpaceFormatError(GemsError, ValueError):
    """A null-space file is not a gems null-space file, is corrupted, or has an unsupported format version."""


class IncompatibleNullSpaceError(GemsError, ValueError):
    """A null space does not fit a model: a module is missing or its weight has another shape."""


# --------------------------------------------------------------------------------------------------
# threshold selection and target resolution
# --------------------------------------------------------------------------------------------------


def _check_mode(mode: str, threshold: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    if mode == "absolute" and threshold < 0:
        raise ValueError(f"absolute threshold must be >= 0, got {threshold!r}")
    if mode == "energy" and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"energy threshold is a fraction in [0, 1], got {threshold!r}")
    if mode == "topk" and (threshold < 0 or float(threshold) != int(threshold)):
        raise ValueError(f"topk threshold is a non-negative integer k, got {threshold!r}")


def select_rank(spectrum: Tensor, threshold: float, mode: str, *, energy: Tensor | None = None) -> int:
    """Number k of leading directions to protect, given a spectrum sorted in descending order.

    - ``"absolute"``: k = #{values > threshold}.
    - ``"energy"``: the smallest k whose leading ``energy`` values (default: ``spectrum``) hold at least
      ``threshold`` of their sum; 0 when the sum is 0.
    - ``"topk"``: k = int(threshold), clipped to the dimension.
    """
    _check_mode(mode, threshold)
    d = int(spectrum.numel())
    if d == 0:
        return 0
    if mode == "absolute":
        return int((spectrum > threshold).sum().item())
    if mode == "topk":
        return min(int(threshold), d)
    vals = (spectrum if energy is None else energy).double().clamp_min(0)
    cum = torch.cumsum(vals, 0)
    total = float(cum[-1])
    if total <= 0 or threshold <= 0:
        return 0
    # tolerance of a few ulps of the sum so that threshold=1 on a rank-r spectrum gives r, not d
    need = threshold * total - 4 * d * torch.finfo(torch.float64).eps * total
    return min(int((cum < need).sum().item()) + 1, d)


def resolve_targets(model: nn.Module, target_modules: TargetFilter = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules a filter selects, by qualified name (``named_modules`` order), with the
    same rule :class:`gems.GemsOptimizer` uses (:func:`gems.targets.select_linear_modules`), so the same
    ``target_modules`` selects the same weights in both; DDP-style ``.module`` wrappers are unwrapped.

    ``None``: every ``nn.Linear`` except an LM head (a module named ``lm_head`` or whose weight is an
    embedding's weight). A string or a list of strings: regular expressions searched in module names (a
    plain substring works). A callable ``(name, module) -> bool``, called on the ``nn.Linear`` modules. A
    filter that selects nothing raises ``ValueError`` (the authors' code silently protected nothing)."""
    return dict(select_linear_modules(unwrap(model), target_modules))


# --------------------------------------------------------------------------------------------------
# calibration helpers
# --------------------------------------------------------------------------------------------------


def _to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


class _CovarianceAccumulator:
    """Streaming Σ x xᵀ and row count for one module (never holds more than one batch of activations)."""

    def __init__(self, dim: int, dtype: torch.dtype):
        self.dim = dim
        self.dtype = dtype
        self.gram: Tensor | None = None
        self.count = 0
        self.mask_mismatch = False

    def add(self, x: Tensor, mask: Tensor | None) -> None:
        if x.shape[-1] != self.dim:
            raise RuntimeError(f"activation of width {x.shape[-1]} where {self.dim} was expected")
        if mask is not None:
            if tuple(mask.shape) == tuple(x.shape[:-1]):
                x = x[mask.to(device=x.device, dtype=torch.bool)]
            else:
                self.mask_mismatch = True
        rows = x.reshape(-1, self.dim).to(self.dtype)
        if rows.shape[0] == 0:
            return
        if self.gram is None:
            self.gram = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=rows.device)
        self.gram.addmm_(rows.T, rows)
        self.count += int(rows.shape[0])


def _eig_desc(gram: Tensor, noise_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of a symmetric PSD matrix, in fp64.

    Eigenvalues below the numerical-rank tolerance d·eps(noise_dtype)·λ_max (the dtype the matrix was
    accumulated in) are set to exactly 0, so that a zero threshold does not protect rounding noise."""
    g = gram.double()
    g = 0.5 * (g + g.T)
    vals, vecs = torch.linalg.eigh(g)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    if vals.numel():
        tol = vals.numel() * torch.finfo(noise_dtype).eps * float(vals[0])
        vals = torch.where(vals <= tol, torch.zeros_like(vals), vals)
    return vals, vecs


def orthonormality_error(q: Tensor) -> float:
    """max |QᵀQ − I| in fp64 (0 for a basis without columns): the one orthonormality measure, for null-space
    bases and for the subspace bases of a checkpoint alike (each with its own tolerance)."""
    return 0.0 if q.shape[1] == 0 else float(orthonormality_errors(q.unsqueeze(0))[0])


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


def _check_finite_gram(name: str, acc: "_CovarianceAccumulator", side: str, n_batches: int) -> None:
    # one reduction per module after streaming, not one per batch: a NaN/Inf in any batch reaches the sum
    if not bool(torch.isfinite(acc.gram).all()):
        raise ValueError(
            f"null-space calibration: the {side} activations of module {name!r} were not finite (NaN or Inf) "
            f"in at least one of the {n_batches} calibration batches ({acc.count} rows); check those batches "
            f"and the model's weights, or use dtype=torch.float64 if finite activations overflowed the sum")


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
            problem = _basis_problem(q) if check else None
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
        if side not in PROTECT_SIDES:
            raise ValueError(f"side must be one of {PROTECT_SIDES}, got {side!r}")
        _check_mode(mode, threshold)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        targets = resolve_targets(model, target_modules)
        shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}

        bases: dict[str, Tensor] = {}
        spectra: dict[str, Tensor] = {}
        samples: dict[str, int] = {}
        if side == "weight":
            for name, mod in targets.items():
                w = mod.weight.detach().double()
                if not bool(torch.isfinite(w).all()):
                    raise ValueError(f"null-space calibration: the weight of module {name!r} is not finite "
                                     f"(NaN or Inf)")
                _, s, vh = torch.linalg.svd(w, full_matrices=True)  # all n right singular vectors
                sv = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
                sv[: s.numel()] = s
                vecs = vh.T
                k = select_rank(sv, threshold, mode, energy=sv * sv)
                bases[name] = vecs[:, :k].float().contiguous()
                spectra[name] = sv.cpu()
                samples[name] = 0
        else:
            if batches is None:
                raise ValueError(f"side={side!r} needs calibration batches (only side='weight' is data-free)")
            accs = {n: _CovarianceAccumulator(m.in_features if side == "input" else m.out_features, dtype)
                    for n, m in targets.items()}
            state: dict[str, Tensor | None] = {"mask": None}

            def make_hook(acc: _CovarianceAccumulator):
                def hook(_mod, inputs, output):
                    x = inputs[0] if side == "input" else output
                    if isinstance(x, (tuple, list)):
                        x = x[0]
                    acc.add(x.detach(), state["mask"])
                return hook

            was_training = model.training
            device = _model_device(model)
            handles = []
            n_batches = 0
            try:
                for name, mod in targets.items():
                    handles.append(mod.register_forward_hook(make_hook(accs[name])))
                model.eval()
                with torch.no_grad():
                    for batch in batches:
                        if max_batches is not None and n_batches >= max_batches:
                            break
                        batch = _to_device(batch, device)
                        if isinstance(batch, Mapping):
                            state["mask"] = batch.get("attention_mask")
                            model(**batch)
                        elif isinstance(batch, (tuple, list)):
                            state["mask"] = None
                            model(*batch)
                        else:
                            state["mask"] = None
                            model(batch)
                        n_batches += 1
            finally:
                for h in handles:
                    h.remove()
                state["mask"] = None
                model.train(was_training)
            if n_batches == 0:
                raise ValueError("calibration got no batches: pass a non-empty iterable of batches")
            unseen = [n for n, a in accs.items() if a.count == 0]
            if unseen:
                logger.warning("null-space calibration saw no activations for %d module(s) (left unprotected): %s",
                               len(unseen), ", ".join(unseen))
            mism = [n for n, a in accs.items() if a.mask_mismatch]
            if mism:
                logger.warning("attention_mask did not match the activation shape of %d module(s); all "
                               "positions (padding included) were used for: %s", len(mism), ", ".join(mism))
            for name, acc in accs.items():
                if acc.count == 0 or acc.gram is None:
                    bases[name] = torch.zeros(acc.dim, 0)
                    spectra[name] = torch.zeros(acc.dim, dtype=torch.float64)
                    samples[name] = 0
                    continue
                _check_finite_gram(name, acc, side, n_batches)
                vals, vecs = _eig_desc(acc.gram / acc.count, dtype)
                k = select_rank(vals, threshold, mode)
                bases[name] = vecs[:, :k].float().contiguous()
                spectra[name] = vals.cpu()
                samples[name] = acc.count
        ns = cls(bases, side=side, threshold=float(threshold), mode=mode, spectra=spectra, samples=samples,
                 shapes=shapes, accumulate_dtype=str(dtype).replace("torch.", ""), check=False)
        ns._warn_degenerate()
        return ns

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
    def _metadata(self) -> dict[str, str]:
        rep = self.report()
        modules = {}
        for name, r in rep.items():
            entry = dict(r)
            if name in self._shapes:
                entry["weight_shape"] = list(self._shapes[name])
            spec = self._spectra.get(name)
            entry["eigenvalues"] = 0 if spec is None else int(spec.numel())
            modules[name] = entry
        from gems.version import __version__

        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "gems_version": str(__version__),
            "side": self._side,
            "mode": json.dumps(self.mode),
            "threshold": json.dumps(self.threshold),
            "accumulate_dtype": json.dumps(self.accumulate_dtype),
            "modules": json.dumps(modules),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Writes a safetensors file (bases keyed by module name, spectra under ``__spectrum__.<name>``,
        JSON metadata) atomically: a temporary file in the same folder, then ``os.replace``."""
        from safetensors.torch import save as st_save

        path = Path(path)
        tensors = {name: q.detach().cpu().contiguous() for name, q in self._bases.items()}
        for name, spec in self._spectra.items():
            tensors[_SPECTRUM_PREFIX + name] = spec.detach().cpu().contiguous()
        data = st_save(tensors, metadata=self._metadata())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> "NullSpace":
        """Reads a file written by :meth:`save`. Raises :class:`gems.errors.MissingResourceError` (a
        ``FileNotFoundError``) for a missing file and :class:`NullSpaceFormatError` for anything else wrong."""
        from safetensors.torch import load as st_load

        path = Path(path)
        if not path.is_file():
            raise MissingResourceError(f"null-space file not found: {path}")
        raw = path.read_bytes()
        try:
            tensors = st_load(raw)
            if len(raw) < 8:
                raise ValueError("file too short")
            header_len = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + header_len].decode("utf-8"))
            meta = header.get("__metadata__") or {}
        except Exception as exc:  # safetensors raises its own error types
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise NullSpaceFormatError(f"cannot read null-space file {path}: corrupted or not safetensors "
                                       f"({msg})") from None
        if meta.get("format") != FORMAT_NAME:
            raise NullSpaceFormatError(f"{path} is not a gems null-space file (metadata format="
                                       f"{meta.get('format')!r}, expected {FORMAT_NAME!r})")
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise NullSpaceFormatError(f"{path} has null-space format version {version!r}; this gems reads "
                                       f"version {FORMAT_VERSION}")
        try:
            side = meta["side"]
            mode = json.loads(meta["mode"])
            threshold = json.loads(meta["threshold"])
            acc_dtype = json.loads(meta.get("accumulate_dtype", "null"))
            modules = json.loads(meta["modules"])
        except (KeyError, ValueError) as exc:
            raise NullSpaceFormatError(f"{path} has malformed null-space metadata ({exc})") from None
        bases, spectra, samples, shapes = {}, {}, {}, {}
        for name, info in modules.items():
            q = tensors.get(name)
            if q is None:
                raise NullSpaceFormatError(f"{path} lists module {name!r} but holds no basis for it")
            if q.dim() != 2 or list(q.shape) != [info.get("total_dim"), info.get("protected_dim")]:
                raise NullSpaceFormatError(f"{path}: basis of module {name!r} has shape {tuple(q.shape)}, "
                                           f"metadata says {info.get('total_dim')}×{info.get('protected_dim')}")
            if q.dtype != torch.float32:  # save() always writes fp32
                raise NullSpaceFormatError(f"{path}: basis of module {name!r} is {q.dtype}, expected torch.float32")
            problem = _basis_problem(q)
            if problem:
                raise NullSpaceFormatError(f"{path}: basis of module {name!r} {problem}; the file is corrupted "
                                           f"or was edited")
            bases[name] = q.to(device)
            spec = tensors.get(_SPECTRUM_PREFIX + name)
            if spec is not None:
                n_eig = info.get("eigenvalues", spec.numel())
                if spec.dim() != 1 or not spec.is_floating_point() or spec.numel() != n_eig:
                    raise NullSpaceFormatError(f"{path}: spectrum of module {name!r} is a {spec.dtype} tensor of "
                                               f"shape {tuple(spec.shape)}, metadata says {n_eig} eigenvalues")
                spectra[name] = spec
            samples[name] = int(info.get("samples", 0))
            if "weight_shape" in info:
                shapes[name] = info["weight_shape"]
        try:
            return cls(bases, side=side, threshold=threshold, mode=mode, spectra=spectra, samples=samples,
                       shapes=shapes, accumulate_dtype=acc_dtype, check=False)
        except ValueError as exc:
            raise NullSpaceFormatError(f"{path}: {exc}") from None


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
