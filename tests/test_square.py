"""robustops.attacks.square: Square Attack (Andriushchenko et al., ECCV 2020), L-inf and L2.

- the p schedule and side lengths against a table written out by hand from the definition (halvings
  after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000; the 10000-query rescaling);
- eta^(h1, h2) against a transcription of the authors' nested-square loop, and the meta pseudo-Gaussian;
- the init points, seen by the model as its first query: L-inf vertical stripes of +-eps, L2 a grid
  of signed (possibly transposed) meta pseudo-Gaussian squares with ||delta||_2 = eps;
- every queried point lies in [0, 1] and within eps, and the per-sample query counts equal the rows of
  that sample the model was fed (rows identified by their nearest clean image), with restarts, skip and
  a zero eps; a model that raises under grad mode; the same result for the same (seed, offset), for a
  batch split at matching offsets, and without early stop (only the queries grow);
- a model whose forward rounds its input to 1/255 steps (zero input gradient): PGD and APGD find almost
  nothing, Square breaks most points (L-inf eps 0.3, 300 queries);
- strength: robust accuracy no higher than torchattacks.Square's + 3 points on 64 digits test points
  (SmallCNN, 2 epochs), L-inf eps 0.15 and L2 eps 1.0, 300 queries, p_init 0.8, both schedules;
- argument checks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import RoundInput, one_thread, train_digits_model  # noqa: F401 (one_thread: an autouse fixture)

from robustops.attacks import APGD, PGD, Square, SquareResult, square_p_selection
from robustops.attacks.square import P_HALVINGS, eta_rectangle, meta_pseudo_gaussian, square_side
from robustops.data import load_digits


@pytest.fixture(scope="module")
def model():
    return train_digits_model(epochs=2, seed=0)


@pytest.fixture(scope="module")
def digits():
    return tuple(t[:64] for t in load_digits("test").tensors)


def recording(net):
    """(a model callable that records a copy of every batch it is fed and raises under grad mode, the
    list of those batches)."""
    seen = []

    def forward(x):
        if torch.is_grad_enabled():
            raise RuntimeError("this model has no gradients")
        seen.append(x.detach().clone())
        return net(x)

    return forward, seen


def _linear(c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 10)).requires_grad_(False).apply(
        lambda m: isinstance(m, nn.Linear) and m.weight.copy_(torch.randn(m.weight.shape, generator=g)))


# ------------------------------------------------------------------------------ definitions

def test_p_schedule_table():
    table = [(0, 0.8), (10, 0.8), (11, 0.4), (50, 0.4), (51, 0.2), (200, 0.2), (201, 0.1), (500, 0.1),
             (501, 0.05), (1000, 0.05), (1001, 0.025), (2000, 0.025), (2001, 0.0125), (4000, 0.0125),
             (4001, 0.00625), (6000, 0.00625), (6001, 0.003125), (8000, 0.003125), (8001, 0.0015625),
             (20000, 0.0015625)]
    for it, p in table:
        assert square_p_selection(it, 5000, 0.8) == pytest.approx(p, rel=1e-12), it
    assert P_HALVINGS == (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
    # rescaled to 10000 queries: it -> int(it / n_queries * 10000)
    for it, p in [(0, 0.8), (1, 0.2), (2, 0.2), (3, 0.1), (5, 0.1), (6, 0.05), (10, 0.05), (11, 0.025),
                  (40, 0.0125), (41, 0.00625), (81, 0.0015625), (99, 0.0015625)]:
        assert square_p_selection(it, 100, 0.8, rescale=True) == pytest.approx(p, rel=1e-12), it
    # sides: round(sqrt(p H W)); L-inf >= 1; L2 >= 3 and odd; at most min(H, W)
    assert [square_side(p, 8, 8, "linf") for p in (0.8, 0.25, 0.1, 0.001, 1.0)] == [7, 4, 3, 1, 8]
    assert [square_side(p, 8, 8, "l2") for p in (0.8, 0.25, 0.1, 0.001, 1.0)] == [7, 5, 3, 3, 7]
    assert square_side(0.05, 32, 32, "linf") == 7 and square_side(0.8, 6, 10, "linf") == 6


def test_eta_matches_the_nested_squares():
    def loop(a, b):  # the authors' construction: nested squares of half-width k get 1 / (k + 1)^2
        d = torch.zeros(a, b, dtype=torch.float64)
        for k in range(max(a // 2, b // 2) + 1):
            d[max(a // 2 - k, 0):a // 2 + k + 1, max(b // 2 - k, 0):b // 2 + k + 1] += 1.0 / (k + 1) ** 2
        return (d / d.norm()).float()

    for a, b in [(1, 1), (2, 5), (3, 5), (4, 9), (5, 5), (6, 13)]:
        torch.testing.assert_close(eta_rectangle(a, b), loop(a, b))
    m = meta_pseudo_gaussian(7)
    assert m.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert bool((m[:3] > 0).all()) and bool((m[3:] < 0).all())
    top, bottom = eta_rectangle(3, 7), -eta_rectangle(4, 7)
    k = m[:3].norm() / top.norm()
    torch.testing.assert_close(m, torch.cat([top, bottom]) * k)
    assert torch.equal(meta_pseudo_gaussian(1), torch.tensor([[-1.0]]))


# -------------------------------------------------------------------------------- init points

def test_linf_init_is_vertical_stripes(digits):
    x = torch.rand(6, 3, 10, 12, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    rec, seen = recording(_linear(3, 10, 12))
    Square(rec, 0.1, n_queries=1, seed=0).perturb(x, torch.zeros(6, dtype=torch.long))
    d = seen[0] - x
    torch.testing.assert_close(d.abs(), torch.full_like(d, 0.1))
    s = d > 0
    assert torch.equal(s, s[:, :, :1].expand_as(s))                   # every column of a channel: one sign
    s = s[:, :, 0]
    assert 0.3 < s.float().mean() < 0.7 and not torch.equal(s[0], s[1])
    # on images touching the box: clip(x + eps * r) with one sign per column
    xd, yd = digits
    rec, seen = recording(_linear(1, 8, 8))
    Square(rec, 0.15, n_queries=1, seed=0).perturb(xd, yd)
    up = (seen[0] > xd).any(2, keepdim=True) | ((xd + 0.15).clamp(0, 1) == seen[0]).all(2, keepdim=True)
    torch.testing.assert_close(seen[0], torch.where(up, xd + 0.15, xd - 0.15).clamp(0, 1))


def test_l2_init_is_a_grid_of_pseudo_gaussian_squares():
    x = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(2)) * 0.2 + 0.4
    rec, seen = recording(_linear(3, 20, 20))
    Square(rec, 1.0, norm="l2", n_queries=1, seed=3).perturb(x, torch.zeros(4, dtype=torch.long))
    d = seen[0] - x
    torch.testing.assert_close(d.flatten(1).norm(dim=1), torch.ones(4))   # no clipping here: norm eps
    m = meta_pseudo_gaussian(4)                                           # side 20 // 5, a 5 x 5 grid at 0
    k = 1.0 / (25 * 3) ** 0.5                                             # 75 unit-norm squares share eps
    transposed = []
    for b in range(4):
        for r in range(0, 20, 4):
            for c in range(0, 20, 4):
                blk = d[b, :, r:r + 4, c:c + 4]
                t = torch.allclose(blk[0].abs(), k * m.t().abs(), atol=1e-5)
                assert t or torch.allclose(blk[0].abs(), k * m.abs(), atol=1e-5)
                pat = k * (m.t() if t else m)
                for ch in range(3):
                    assert torch.allclose(blk[ch], pat, atol=1e-5) or torch.allclose(blk[ch], -pat, atol=1e-5)
                transposed.append(t)
    assert 0.2 < sum(transposed) / len(transposed) < 0.8


# ---------------------------------------------------------------------- constraints and queries

@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 1.0)])
def test_every_query_in_ball_and_box_and_counted(model, digits, norm, eps):
    dist = (lambda a, b: (a - b).abs().amax(-1)) if norm == "linf" else (lambda a, b: (a - b).norm(dim=-1))
    pick = []                                  # images more than 2 eps apart: a row identifies its image
    for i in range(64):
        if all(dist(digits[0][i].flatten(), digits[0][j].flatten()) > 2 * eps for j in pick):
            pick.append(i)
    x, y = digits[0][pick[:24]], digits[1][pick[:24]]
    assert x.shape[0] == 24
    e = torch.full((24,), eps)
    e[3] = 0.0
    skip = torch.zeros(24, dtype=torch.bool)
    skip[5] = True
    rec, seen = recording(model)
    res = Square(rec, e, norm=norm, n_queries=40, restarts=2, seed=0).perturb(x, y, skip=skip)
    assert isinstance(res, SquareResult)
    rows = torch.cat(seen)
    assert float(rows.min()) >= 0.0 and float(rows.max()) <= 1.0
    dd = dist(rows.flatten(1)[:, None], x.flatten(1)[None])
    owner = dd.argmin(1)
    assert bool((dd.min(1).values <= e[owner] * (1 + 1e-5) + 1e-6).all())
    counts = torch.bincount(owner, minlength=24)
    assert torch.equal(counts, res.queries)
    assert res.queries[5] == 0 and res.success[5] and res.success_step[5] == 0
    broken = res.success & ~skip
    assert torch.equal(res.success_step[broken], res.queries[broken])
    assert bool((res.queries[~res.success] == 80).all())                  # 2 restarts x 40 queries
    assert bool(broken.any()) and bool((~res.success).any())
    assert res.queries[3] == 80 and not res.success[3] and torch.equal(res.x_adv[3], x[3])
    with torch.no_grad():
        logits = model(res.x_adv)
    assert torch.equal(logits.argmax(1)[~skip], res.pred[~skip])
    assert bool((logits.argmax(1) != y)[broken].all())


def test_gradient_free_model_seed_offset_and_early_stop(model, digits):
    x, y = digits[0][:16], digits[1][:16]
    rec, _ = recording(model)                                            # raises under grad mode
    atk = Square(rec, 0.15, n_queries=60, seed=5)
    a = atk.perturb(x, y, offset=0)
    b = atk.perturb(x, y, offset=0)
    for f in ("x_adv", "success", "success_step", "queries", "loss", "pred"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    c = atk.perturb(x, y, offset=100)
    assert not torch.equal(a.x_adv, c.x_adv)
    # a sample's draws depend on (seed, offset + index) only: a split batch gives the same answer
    h1, h2 = atk.perturb(x[:7], y[:7], offset=0), atk.perturb(x[7:], y[7:], offset=7)
    assert torch.equal(torch.cat([h1.success, h2.success]), a.success)
    assert torch.equal(torch.cat([h1.queries, h2.queries]), a.queries)
    torch.testing.assert_close(torch.cat([h1.x_adv, h2.x_adv]), a.x_adv)
    # without early stop: the same answer, every sample queried for the whole budget
    d = Square(rec, 0.15, n_queries=60, seed=5, early_stop=False).perturb(x, y, offset=0)
    assert torch.equal(d.x_adv, a.x_adv) and torch.equal(d.success_step, a.success_step)
    assert bool((d.queries == 60).all()) and bool((a.queries <= 60).all()) and a.queries.sum() < 60 * 16


def test_masked_gradients_square_breaks_most(model, digits):
    x, y = digits
    masked = RoundInput(model).eval()
    with torch.no_grad():
        ok = masked(x).argmax(1) == y
    eps = 0.3

    def robust(xa):
        with torch.no_grad():
            return ((masked(xa).argmax(1) == y) & ok).float().mean().item()

    x_pgd = PGD(masked, eps=eps, alpha=eps / 4, steps=10, seed=0)(x, y)
    x_apgd = APGD(masked, eps=eps, steps=10, seed=0)(x, y)
    res = Square(masked, eps, n_queries=300, seed=0, rescale_schedule=True).perturb(x, y)
    clean, r_pgd, r_apgd, r_sq = ok.float().mean().item(), robust(x_pgd), robust(x_apgd), robust(res.x_adv)
    assert r_pgd > 0.6 * clean and r_apgd > 0.6 * clean, (clean, r_pgd, r_apgd)
    assert r_sq < 0.25 * clean, (clean, r_sq)


@pytest.mark.parametrize("norm,eps,rescale", [("linf", 0.15, False), ("linf", 0.15, True), ("l2", 1.0, True)])
def test_not_weaker_than_torchattacks(model, digits, norm, eps, rescale):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits
    with torch.no_grad():
        ok = model(x).argmax(1) == y

    def robust(xa):
        with torch.no_grad():
            return ((model(xa).argmax(1) == y) & ok).float().mean().item()

    ours = robust(Square(model, eps, norm=norm, n_queries=300, p_init=0.8, seed=0,
                         rescale_schedule=rescale).perturb(x, y).x_adv)
    ta = torchattacks.Square(model, norm="Linf" if norm == "linf" else "L2", eps=eps, n_queries=300, p_init=0.8,
                             resc_schedule=rescale, seed=0)
    theirs = robust(ta(x, y))
    assert ours <= theirs + 0.03, (ours, theirs)


def test_bad_arguments(model):
    for kw, word in [(dict(eps=-1.0), "eps"), (dict(eps="a"), "eps"), (dict(norm="l1"), "norm"),
                     (dict(n_queries=0), "n_queries"), (dict(n_queries=2.5), "n_queries"), (dict(p_init=0.0), "p_init"),
                     (dict(p_init=1.5), "p_init"), (dict(loss="dlr"), "loss"), (dict(restarts=0), "restarts")]:
        args = dict(eps=0.1)
        args.update(kw)
        with pytest.raises((ValueError, TypeError), match=word):
            Square(model, **args)
    atk = Square(model, 0.1)
    with pytest.raises(ValueError, match="images"):
        atk.perturb(torch.rand(2, 64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        atk.perturb(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), eps=torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="targets"):
        atk.perturb(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="p_init"):
        square_p_selection(3, 10, 0.0)
    empty = atk.perturb(torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    assert empty.queries.shape == (0,) and empty.x_adv.shape == (0, 1, 8, 8)
