"""Collaborative item vectors (gems.recipes.collab) and the standardised bilinear rec head."""
import pytest
import torch

from gems.recipes.collab import energy_directions, inject_factors, transition_factors
from gems.recipes.model import BilinearItemHead

# item 0 -> 1 always, 2 -> 3 always, item 4 only ever last (never followed), item 5 never seen
SEQS = {"a": [0, 1, 2, 3], "b": [0, 1, 4], "c": [2, 3, 0, 1], "d": [2, 3, 4]}


def test_factors_rank_the_observed_successor_first_and_leave_unseen_items_at_zero():
    left, right = transition_factors(SEQS, 6, dim=4)
    assert left.shape == right.shape == (6, 4) and left.dtype == torch.float32
    scores = left @ right.T
    assert int(scores[0].argmax()) == 1 and int(scores[2].argmax()) == 3
    assert not left[5].any() and not right[5].any()        # never in a transition
    assert not left[4].any()                                # never followed by anything: no "from" factor
    # deterministic signs: a second call gives the same vectors
    l2, r2 = transition_factors(SEQS, 6, dim=4)
    assert torch.equal(left, l2) and torch.equal(right, r2)


def test_factors_are_the_truncated_ppmi_factorisation():
    left, right = transition_factors(SEQS, 6, dim=6)       # full rank: the product is the PPMI matrix itself
    c = torch.zeros(6, 6, dtype=torch.float64)
    for seq in SEQS.values():
        for x, y in zip(seq, seq[1:]):
            c[x, y] += 1
    pmi = torch.log(c * c.sum() / (c.sum(1, keepdim=True) * c.sum(0, keepdim=True)))
    ppmi = torch.where(c > 0, pmi, torch.zeros(())).clamp_min(0).float()
    torch.testing.assert_close(left @ right.T, ppmi, atol=1e-5, rtol=1e-5)


def test_factors_reject_bad_arguments():
    with pytest.raises(ValueError, match="dim must be in"):
        transition_factors(SEQS, 6, dim=7)
    with pytest.raises(ValueError, match="no transitions"):
        transition_factors({"a": [1]}, 6, dim=2)


def test_injection_keeps_geometry_and_scales_to_the_title_rows():
    g = torch.Generator().manual_seed(0)
    rows, f = torch.randn(10, 16, generator=g) * 3, torch.randn(10, 4, generator=g)
    out = inject_factors(rows, f, 0.5, seed=1)
    part = out - rows
    assert part.norm(dim=1).mean() == pytest.approx(0.5 * rows.norm(dim=1).mean().item(), rel=1e-5)
    # an orthonormal map: inner products of the factors are kept up to the one scale
    k = (part @ part.T)[0, 0] / (f @ f.T)[0, 0]
    torch.testing.assert_close(part @ part.T, k * (f @ f.T), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inject_factors(rows, f, 0.0), rows, rtol=0, atol=0)
    assert torch.equal(inject_factors(rows, f, 0.5, seed=1), out)
    assert not torch.equal(inject_factors(rows, f, 0.5, seed=2), out)
    with pytest.raises(ValueError, match="dim <= hidden"):
        inject_factors(rows, torch.randn(10, 17), 1.0)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        inject_factors(rows, f, -1.0)


def test_bilinear_head_standardises_its_input_and_maps_hidden_to_item_dim():
    g = torch.Generator().manual_seed(0)
    items, prior = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    center, scale = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5
    head = BilinearItemHead(items, prior, hidden_size=8, center=center, scale=scale)
    assert head.map.shape == (8, 3)
    with torch.no_grad():
        head.map.copy_(torch.randn(8, 3, generator=g))
    h = torch.randn(2, 4, 8, generator=g)
    e = items / items.norm(dim=1, keepdim=True)
    want = ((h - center) / scale) @ head.map @ e.T + (prior - prior.mean())
    torch.testing.assert_close(head(h), want)
    # the standardisation changes the scores (a head that ignored it would fail here)
    plain = BilinearItemHead(items, prior, hidden_size=8)
    with torch.no_grad():
        plain.map.copy_(head.map)
    assert not torch.allclose(plain(h), head(h))
    for bad in (dict(scale=torch.zeros(8)), dict(center=torch.ones(7)), dict(scale=torch.full((8,), float("nan")))):
        with pytest.raises(ValueError, match="must be 8 finite values"):
            BilinearItemHead(items, prior, hidden_size=8, **bad)


def test_energy_directions_hold_the_asked_share_of_the_energy():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=g))[0]
    # energies 100, 10, 1, 0.1, ... along known orthonormal directions
    h = torch.randn(400, 12, generator=g) * (10.0 ** -torch.arange(12.0) * 10) @ basis.T
    e = (h.double().T @ h.double()).trace()
    for energy in (0.5, 0.95, 0.999):
        d = energy_directions(h, energy).double()
        share = float(((h.double() @ d) ** 2).sum() / e)
        assert share >= energy
        fewer = d[:, :-1]                                    # one direction fewer would not be enough
        assert float(((h.double() @ fewer) ** 2).sum() / e) < energy
        torch.testing.assert_close(d.T @ d, torch.eye(d.shape[1], dtype=torch.float64), atol=1e-6, rtol=0)
    assert energy_directions(h, 0.0).shape == (12, 0)
    with pytest.raises(ValueError, match="energy must be in"):
        energy_directions(h, 1.0)
    with pytest.raises(ValueError, match="finite"):
        energy_directions(torch.full((3, 4), float("nan")), 0.5)


def test_injection_stays_orthogonal_to_the_avoided_directions():
    g = torch.Generator().manual_seed(0)
    rows, f = torch.randn(10, 16, generator=g), torch.randn(10, 4, generator=g)
    avoid = torch.randn(16, 9, generator=g)                 # any spanning set: orthonormalised inside
    part = inject_factors(rows, f, 1.0, seed=3, avoid=avoid) - rows
    torch.testing.assert_close(avoid.T @ part.T, torch.zeros(9, 10), atol=1e-4, rtol=0)
    assert (avoid.T @ (inject_factors(rows, f, 1.0, seed=3) - rows).T).abs().max() > 0.1   # without: it is not
    k = (part @ part.T)[0, 0] / (f @ f.T)[0, 0]             # geometry kept as without avoid
    torch.testing.assert_close(part @ part.T, k * (f @ f.T), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="k \\+ dim <= hidden"):
        inject_factors(rows, f, 1.0, avoid=torch.randn(16, 13, generator=g))
