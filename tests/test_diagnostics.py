"""Diagnostics: pure functions on tensors returning python floats."""
from __future__ import annotations

import math

import pytest
import torch

from gems.diagnostics import (
    captured_energy,
    conflict_ratio,
    flatten_diagnostics,
    gradient_cosines,
    layer_diagnostics,
    principal_angles,
)


def _orth(d, k, gen):
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0].float()


def test_cosines_of_conflicting_tasks():
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(12, 10, generator=gen)
    search = -common + 0.1 * torch.randn(12, 10, generator=gen)
    rec = common + 0.1 * torch.randn(12, 10, generator=gen)
    aligned = common.clone()
    cos = gradient_cosines({"search": search, "rec": rec, "aux": aligned})
    assert list(cos) == [("search", "rec"), ("search", "aux"), ("rec", "aux")]
    assert cos[("search", "rec")] < -0.9 and cos[("rec", "aux")] > 0.9
    assert all(isinstance(v, float) for v in cos.values())
    assert gradient_cosines({"a": torch.zeros(3), "b": torch.ones(3)}) == {("a", "b"): 0.0}


def test_conflict_ratio_known_values():
    a = torch.tensor([1.0, 2.0, -3.0, 4.0])
    b = torch.tensor([-1.0, 2.0, 3.0, 0.0])  # opposite on elements 0 and 2; zero does not conflict
    assert conflict_ratio({"a": a, "b": b}) == 0.5
    assert conflict_ratio({"a": a, "neg": -a}) == 1.0
    # three tasks: mean over pairs (a,b)=0.5, (a,a2)=0, (b,a2)=0.5
    assert conflict_ratio({"a": a, "b": b, "a2": a.clone()}) == pytest.approx(1 / 3)
    assert conflict_ratio({"a": a}) == 0.0


def test_captured_energy():
    gen = torch.Generator().manual_seed(1)
    basis = _orth(16, 4, gen)
    inside_right = torch.randn(9, 4, generator=gen) @ basis.T  # rows in span(B): right side
    inside_left = basis @ torch.randn(4, 7, generator=gen)  # columns in span(B): left side
    assert captured_energy(inside_right, basis, "right") == pytest.approx(1.0, abs=1e-6)
    assert captured_energy(inside_left, basis, "left") == pytest.approx(1.0, abs=1e-6)
    orth = torch.randn(9, 16, generator=gen)
    orth = orth - (orth @ basis) @ basis.T
    assert captured_energy(orth, basis, "right") < 1e-10
    assert 0.0 < captured_energy(torch.randn(9, 16, generator=gen), basis, "right") < 1.0
    assert captured_energy(torch.zeros(9, 16), basis, "right") == 0.0
    with pytest.raises(ValueError):
        captured_energy(orth, basis, "up")


def test_principal_angles_identical_and_orthogonal():
    gen = torch.Generator().manual_seed(2)
    q = _orth(20, 6, gen)
    same = principal_angles(q, q @ _orth(6, 6, gen))  # same span, another basis
    assert same.dtype == torch.float64 and same.shape == (6,)
    assert same.abs().max() < 1e-4  # degrees
    eye = torch.eye(20)
    ortho = principal_angles(eye[:, :3], eye[:, 3:8])
    assert ortho.shape == (3,) and torch.allclose(ortho, torch.full((3,), 90.0, dtype=torch.float64))
    # one known angle: 45° between e0 and (e0 + e1)/√2
    mixed = principal_angles(eye[:, :1], (eye[:, :1] + eye[:, 1:2]))
    assert mixed.item() == pytest.approx(45.0, abs=1e-9)
    angles = principal_angles(_orth(20, 5, gen), _orth(20, 3, gen))
    assert angles.shape == (3,) and torch.all(angles[1:] >= angles[:-1])


def test_layer_diagnostics_and_flatten():
    gen = torch.Generator().manual_seed(3)
    grads = {"search": torch.randn(8, 12, generator=gen), "rec": torch.randn(8, 12, generator=gen)}
    shared = _orth(12, 4, gen)
    task = torch.linalg.qr(torch.cat([shared, _orth(12, 2, gen)], 1).double())[0][:, 4:].float()
    q = _orth(12, 3, gen)
    update = torch.randn(8, 12, generator=gen)
    layer = layer_diagnostics(grads, bases={"shared": shared, "search": task}, side="right",
                              update=update, nullspace_basis=q, protect_side="input")
    assert set(layer) == {"cos/search-rec", "conflict", "energy/shared", "energy/search",
                          "angle/shared-search", "leakage"}
    assert layer["angle/shared-search"] == pytest.approx(90.0, abs=1e-4)
    flat = flatten_diagnostics({"layer.0.q_proj": layer,
                                "layer.1.v_proj": {"cos": gradient_cosines(grads), "n": torch.tensor(3),
                                                   "ok": True, "bad": float("nan")}},
                               {"search": torch.tensor(0.6), "rec": 0.4})
    assert "layer.0.q_proj/cos/search-rec" in flat
    assert "layer.1.v_proj/cos/search-rec" in flat and flat["layer.1.v_proj/n"] == 3.0
    assert flat["gate/search"] == pytest.approx(0.6) and flat["layer.1.v_proj/ok"] == 1.0
    assert math.isnan(flat["layer.1.v_proj/bad"])
    assert all(type(v) is float for v in flat.values()) and all(type(k) is str for k in flat)
    assert list(flat) == sorted(flat)
    with pytest.raises(ValueError):
        flatten_diagnostics({"x": {"v": torch.ones(2)}}, {})
