"""Calibration of a null space: which modules are protected (:func:`resolve_targets`), the streaming
covariance of their inputs or outputs (or, data-free, the weight's SVD), its eigendecomposition and how many
directions to keep (:func:`select_rank`): the body of :meth:`gems.NullSpace.calibrate`. Separate from
:mod:`gems.nullspace`, which holds the result and the projections the optimizer calls every step: calibration
runs once, before training, and needs the model and data, the projections need neither.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

from gems.targets import select_linear_modules, unwrap

if TYPE_CHECKING:
    from gems.nullspace import NullSpace

# the null space's logger: its calibration warnings keep the name users filter them by
logger = logging.getLogger("gems.nullspace")

PROTECT_SIDES = ("input", "output", "weight")
MODES = ("absolute", "energy", "topk")

TargetFilter = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]  # = gems.targets.TargetSpec


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


def _check_finite_gram(name: str, acc: "_CovarianceAccumulator", side: str, n_batches: int) -> None:
    # one reduction per module after streaming, not one per batch: a NaN/Inf in any batch reaches the sum
    if not bool(torch.isfinite(acc.gram).all()):
        raise ValueError(
            f"null-space calibration: the {side} activations of module {name!r} were not finite (NaN or Inf) "
            f"in at least one of the {n_batches} calibration batches ({acc.count} rows); check those batches "
            f"and the model's weights, or use dtype=torch.float64 if finite activations overflowed the sum")


def calibrate(
    cls: type[NullSpace],
    model: nn.Module,
    batches: Iterable[Any] | None,
    *,
    side: str,
    threshold: float,
    mode: str,
    target_modules: TargetFilter,
    dtype: torch.dtype,
    max_batches: int | None,
) -> NullSpace:
    """:meth:`gems.NullSpace.calibrate` (documented there); ``cls`` is the class to build."""
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
