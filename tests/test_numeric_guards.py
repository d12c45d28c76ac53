"""Numeric edge cases: extreme-scale gradients in the iterative refreshes, tampered null-space files,
non-finite calibration activations (CPU, seeded, fast)."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from gems.nullspace import NullSpace, NullSpaceFormatError
from gems.refresh import compute_basis, compute_bases

ITERATIVE = ("subspace_iter", "randomized")
RANK = 6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gapped(m: int = 48, n: int = 80, seed: int = 0) -> torch.Tensor:
    """fp32 matrix with a clear gap after the RANK-th singular value, so its top span is well defined."""
    g = _gen(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    s = torch.cat([torch.linspace(10, 5, RANK), torch.linspace(0.5, 0.01, min(m, n) - RANK)]).double()
    return (u[:, : s.numel()] * s @ v[:, : s.numel()].T).float()


def _exact_projector(a64: torch.Tensor, side: str) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a64, full_matrices=False)
    b = u[:, :RANK] if side == "left" else vh[:RANK].T
    return b @ b.T


def _check_basis(basis: torch.Tensor, a64: torch.Tensor, side: str) -> None:
    assert torch.isfinite(basis).all()
    b = basis.double()
    assert (b.T @ b - torch.eye(RANK, dtype=torch.float64)).abs().max() <= 1e-5
    assert (b @ b.T - _exact_projector(a64, side)).abs().max() <= 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ITERATIVE)
def test_iterative_refresh_of_subnormal_gradient(method, side):
    tiny = _gapped() * 1e-40
    assert tiny.abs().max() < torch.finfo(torch.float32).tiny  # entries are subnormal fp32
    basis = compute_basis(tiny, RANK, side, method=method)
    _check_basis(basis, tiny.double() * 1e40, side)
    # same basis as for the same (already rounded) matrix brought back to a normal scale exactly
    normal = (tiny.double() * 2.0**140).float()
    ref = compute_basis(normal, RANK, side, method=method).double()
    assert (basis.double() @ basis.double().T - ref @ ref.T).abs().max() <= 1e-5


@pytest.mark.parametrize("scale", [1e37, 1e30, 1e-30, 0.0])
@pytest.mark.parametrize("method", ITERATIVE)
def test_iterative_refresh_at_extreme_finite_scales(method, scale):
    g = _gapped()
    a = g * scale
    assert torch.isfinite(a).all()
    for side in ("left", "right"):
        basis = compute_basis(a, RANK, side, method=method)
        if scale == 0.0:  # any orthonormal basis will do
            assert torch.isfinite(basis).all()
            b = basis.double()
            assert (b.T @ b - torch.eye(RANK, dtype=torch.float64)).abs().max() <= 1e-5
        else:
            _check_basis(basis, g.double(), side)


@pytest.mark.parametrize("method", ITERATIVE)
def test_subnormal_matrix_in_a_batch_leaves_the_others_alone(method):
    normal = [_gapped(seed=1), _gapped(seed=2)]
    tiny = _gapped(seed=3) * 1e-40
    batched = compute_bases([normal[0], tiny, normal[1]], RANK, "left", method=method,
                            generator=[_gen(1), _gen(2), _gen(3)])
    for got, mat, seed in ((batched[0], normal[0], 1), (batched[2], normal[1], 3)):
        alone = compute_basis(mat, RANK, "left", method=method, generator=_gen(seed))
        assert torch.allclose(got, alone, atol=1e-5)
    _check_basis(batched[1], tiny.double() * 1e40, "left")


# ------------------------------------------------------------------------------------------------
# null-space files
# ------------------------------------------------------------------------------------------------


def _saved(tmp_path):
    q = torch.linalg.qr(torch.randn(16, 3, generator=_gen(), dtype=torch.float64))[0].float()
    ns = NullSpace({"blocks.0.attn": q}, side="input")
    path = tmp_path / "good.safetensors"
    ns.save(path)
    return ns, path


def _tampered(tmp_path, path, name: str, q: torch.Tensor):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors[name] = q.contiguous()
    out = tmp_path / f"bad_{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


def test_load_checks_each_basis(tmp_path):
    ns, path = _saved(tmp_path)
    back = NullSpace.load(path)  # a good file still loads
    assert torch.equal(back.basis("blocks.0.attn"), ns.basis("blocks.0.attn"))
    q = ns.basis("blocks.0.attn")
    skewed = q.clone()
    skewed[:, 1] += 0.5 * skewed[:, 0]  # same span, not orthonormal
    nan = q.clone()
    nan[3, 2] = float("nan")
    cases = [
        (q * 1.5, "orthonormal"),
        (skewed, "orthonormal"),
        (nan, "non-finite"),
        (q.clone().fill_(float("inf")), "non-finite"),
        (q.double(), "float64"),
    ]
    for bad, what in cases:
        with pytest.raises(NullSpaceFormatError, match=what) as err:
            NullSpace.load(_tampered(tmp_path, path, "blocks.0.attn", bad))
        assert "'blocks.0.attn'" in str(err.value)


def test_load_checks_each_spectrum(tmp_path):
    ns = NullSpace.calibrate(_model(), [torch.randn(32, 16, generator=_gen())], side="input")
    path = tmp_path / "cal.safetensors"
    ns.save(path)
    assert NullSpace.load(path).report() == ns.report()
    spec = ns.spectrum("proj_in")
    for bad in (spec[:-1], spec.view(4, 4)):
        with pytest.raises(NullSpaceFormatError, match="spectrum of module 'proj_in'"):
            NullSpace.load(_tampered(tmp_path, path, "__spectrum__.proj_in", bad))


# ------------------------------------------------------------------------------------------------
# calibration on non-finite activations
# ------------------------------------------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(proj_in=nn.Linear(16, 12), act=nn.ReLU(), proj_out=nn.Linear(12, 8)))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_calibrate_names_the_module_with_non_finite_activations(bad_value, dtype):
    g = _gen()
    batches = [torch.randn(8, 16, generator=g) for _ in range(4)]
    batches[2][5, 7] = bad_value
    with pytest.raises(ValueError, match=r"'proj_in'.*not finite \(NaN or Inf\).*batch"):
        NullSpace.calibrate(_model(), batches, side="input", dtype=dtype)
    batches[2][5, 7] = 0.0
    ns = NullSpace.calibrate(_model(), batches, side="input", dtype=dtype)  # the same batches, fixed
    assert set(ns.modules) == {"proj_in", "proj_out"}


def test_calibrate_output_side_names_the_module():
    model = _model()
    with torch.no_grad():
        model.proj_out.bias[0] = float("nan")  # finite inputs, NaN outputs of the last layer only
    batches = [torch.randn(8, 16, generator=_gen())]
    with pytest.raises(ValueError, match=r"output activations of module 'proj_out' were not finite"):
        NullSpace.calibrate(model, batches, side="output")
