"""The clipping-aware prediction (eq. E5-E7): exact on a linear layer against a seeded Monte
Carlo of subtractive dither (where E = D + N holds exactly), level 3L when nothing is clipped,
bad inputs, and a small end-to-end comparison of clipping variants."""

from __future__ import annotations

import numpy as np
import pytest

from distortion.experiments import clipping as cl
from distortion.quantize import UniformQuantizer

torch = pytest.importorskip("torch")

from _array_data import ArrayData  # noqa: E402
from test_multilayer import tiny_net  # noqa: E402


# ----------------------------------------------------------------------------- linear layer
def _linear(d: int = 96, k: int = 4, n: int = 400, seed: int = 0):
    """A float64 linear classifier z = W x + b and its inputs (first-order model exact)."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d, k)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(k, d, generator=g, dtype=torch.float64) / np.sqrt(d))
        net[0].bias.zero_()
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def _grams(net, x, y, n_realizations=40):
    from distortion.experiments.sensitivity import gradient_grams

    return gradient_grams(net, (x, y), granularity="channel", n_realizations=n_realizations,
                          cache=False, progress=False)  # fmt: skip


def test_shift_of_a_linear_layer_is_d_times_x():
    from types import SimpleNamespace

    from distortion.experiments.compare import first_order_actual_flips

    net, x, y = _linear()
    q = UniformQuantizer(3, granularity="channel", clip_ratio=0.6)
    d = q.error_model(net[0].weight.detach(), rule="clipping").deterministic
    z0, z1 = first_order_actual_flips(
        net, ArrayData(x, y), {"0": SimpleNamespace(error=np.array(d))}
    )
    np.testing.assert_allclose(z1 - z0, x.numpy() @ d.T, rtol=1e-12, atol=1e-13)


def test_split_model_against_monte_carlo_of_dither():
    """Dither makes E = D + N exact (N i.i.d. U(-step/2, step/2)); for a linear layer the
    first-order model is exact too, so 3C differs from the simulated flip rate only by the
    Gaussian approximation of N x (96 uniform terms) and the simulation's noise.

    Reference: 3 000 seeded dither draws of the whole layer (seeds 0..2999), flip rate
    over the 400 samples per draw; stderr = std over draws / sqrt(3000) (about 0.0006 here).
    """
    net, x, y = _linear()
    w = net[0].weight.detach().numpy()
    q = UniformQuantizer(3, granularity="channel", clip_ratio=0.6, rounding="dither")
    em = q.error_model(w, rule="clipping")
    grams = _grams(net, x, y)
    xs = x.numpy()
    z = xs @ w.T
    ref = z.argmax(1)
    shift = xs @ em.deterministic.T
    pred = cl.shifted_distortion(grams, [em.second_moment], shift, band=False, n_rotations=8)
    flips = np.array([np.mean((xs @ (w + q.quantize(w, seed=s).error).T).argmax(1) != ref)
                      for s in range(3000)])  # fmt: skip
    se = flips.std(ddof=1) / np.sqrt(flips.size)
    tol = 4 * np.hypot(se, pred.flip_rate_stderr) + 0.003  # + the CLT approximation
    assert abs(pred.flip_rate - flips.mean()) < tol, (pred.flip_rate, flips.mean(), se)


def test_zero_shift_is_level_3l():
    from distortion.theory.multilayer import multilayer_distortion

    net, x, y = _linear(n=300)
    grams = _grams(net, x, y)
    m2 = [np.linspace(1e-3, 3e-3, 4)]
    a = cl.shifted_distortion(grams, m2, np.zeros((300, 4)), seed=7)
    b = multilayer_distortion(grams, m2, seed=7).to_prediction()
    assert a.level == "3C"
    assert a.flip_rate == pytest.approx(b.flip_rate, rel=1e-12)
    assert a.accuracy_loss == pytest.approx(b.accuracy_loss, rel=1e-9, abs=1e-12)
    assert tuple(a.flip_rate_band) == pytest.approx(tuple(b.flip_rate_band))
    assert tuple(a.accuracy_loss_band) == pytest.approx(tuple(b.accuracy_loss_band))


def test_shifted_distortion_bad_inputs():
    net, x, y = _linear(n=50)
    grams = _grams(net, x, y, n_realizations=0)
    with pytest.raises(ValueError, match=r"shift must have shape \(N, K\) = \(50, 4\)"):
        cl.shifted_distortion(grams, [1e-3], np.zeros((50, 3)), band=False)
    with pytest.raises(ValueError, match="shift must be finite"):
        cl.shifted_distortion(grams, [1e-3], np.full((50, 4), np.nan), band=False)
    with pytest.raises(ValueError, match="band=True needs cached error realizations"):
        cl.shifted_distortion(grams, [1e-3], np.zeros((50, 4)))
    with pytest.raises(ValueError, match="one entry per cached layer"):
        cl.shifted_distortion(grams, [1e-3, 1e-3], np.zeros((50, 4)), band=False)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(1)
    net = tiny_net(seed=3, dtype=torch.float32)
    x = torch.randn(200, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, ArrayData(x, y)


def test_compare_clipping_end_to_end(tiny, tmp_path):
    net, data = tiny
    variants = cl.clipping_variants(3, ratios=(1.0, 0.8))
    assert [v for v, _ in variants] == ["max x1", "max x0.8", "full", "mse"]
    res = cl.compare_clipping(net, data, variants, model_name="tiny", cache_dir=tmp_path,
                              progress=False, n_realizations=40)  # fmt: skip
    t = res.table
    assert list(t["variant"]) == ["max x1", "max x0.8", "full", "mse"]
    for c in cl.CLIPPING_COLUMNS:
        assert c in t.columns, c
    by = t.set_index("variant")
    n = len(data)
    assert (by["measured_flips"] == np.rint(by["measured_flip_rate"] * n)).all()
    assert by.loc["max x1", "clipped_fraction"] == 0 and by.loc["max x1", "shift_rms"] == 0
    assert by.loc["max x0.8", "clipped_fraction"] > 0 and by.loc["max x0.8", "shift_rms"] > 0
    assert by.loc["full", "scheme"] == "symmetric-full" and by.loc["full", "clipped_fraction"] > 0
    assert by.loc["max x0.8", "clipping"] == "max*0.8" and by.loc["max x1", "clipping"] == "max"
    assert np.isnan(by.loc["mse", "clip_ratio"])
    # nothing clipped: 3C is 3L up to the radial integration (other directions)
    se = np.hypot(
        by.loc["max x1", "L3C_flip_rate_stderr"], by.loc["max x1", "L3L_flip_rate_stderr"]
    )
    assert (
        abs(by.loc["max x1", "L3C_flip_rate"] - by.loc["max x1", "L3L_flip_rate"]) < 4 * se + 1e-9
    )
    for c in ("L3C_flip_rate", "L3C_flip_rate_low", "L3C_flip_rate_high", "L2L_flip_rate"):
        assert np.all(np.isfinite(t[c].astype(float))), c
    assert (t["L3C_flip_rate_low"] <= t["L3C_flip_rate_high"]).all()
    frame = res.to_frame()
    assert list(frame["variant"]) == list(t["variant"]) and "L3C_flip_rate_in_band" in frame
    order = res.order_agreement()
    assert list(order["level"]) == ["L2L", "L3L", "L3C"] and (order["variants"] == 4).all()
    assert len(res.order_agreement(["max x1", "full"])) == 3
    with pytest.raises(ValueError, match="no variant"):
        res.order_agreement(["nope"])
    # a rerun reads the measured decisions and the Grams back from the cache
    again = cl.compare_clipping(net, data, variants, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.table["measured_flips"], t["measured_flips"])
    np.testing.assert_allclose(again.table["L3C_flip_rate"], t["L3C_flip_rate"])


@pytest.mark.parametrize(
    ("variants", "match"),
    [
        ([], "variants is empty"),
        ([("a", object())], r"variants\[0\] must be a \(name, UniformQuantizer\) pair"),
        ([("a", UniformQuantizer(4)), ("a", UniformQuantizer(3))], "names must be unique"),
    ],
)
def test_compare_clipping_bad_variants(tiny, variants, match):
    net, data = tiny
    with pytest.raises(ValueError, match=match):
        cl.compare_clipping(net, data, variants, progress=False)
