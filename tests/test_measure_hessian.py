"""The HAWQ-V2 Hutchinson trace probes each layer's own Hessian block (defect 14).

Checked against the exact Hessian of a tiny tanh network (float64, ``torch.func.hessian``
of the mean cross-entropy in all analysed weights at once): each layer's estimate within
4 standard errors of the exact block trace, and its per-draw spread that of the block
estimator, :math:`2\\sum_{i\\ne j} H_{\\ell\\ell,ij}^2`, not the larger one of a vector over
all layers at once, which adds :math:`\\sum_{k\\ne\\ell}\\|H_{\\ell k}\\|_F^2`.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from distortion.theory.baselines import HessianTrace, hawq_v2_sensitivity

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

LAYERS = ["0", "3", "5"]


def _tanh_net(seed: int = 0) -> nn.Module:
    """Conv(2->3, 3x3) - tanh - Linear(27->6) - tanh - Linear(6->4): 240 weights, with
    second-order terms in every block (tanh is not piecewise linear)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(27, 6),
        nn.Tanh(),
        nn.Linear(6, 4),
    ).to(torch.float64)
    with torch.no_grad():
        for m in net:
            if hasattr(m, "weight"):
                m.weight.mul_(2.0)
    return net.eval()


def _data(n: int = 60, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def _exact_hessian(net, x, y):
    """Full Hessian of the mean cross-entropy in the analysed weights, and the block slices."""
    from torch.func import functional_call, hessian

    params = {k: v.detach() for k, v in net.named_parameters()}
    names = [f"{n}.weight" for n in LAYERS]
    shapes = [params[n].shape for n in names]
    sizes = [int(np.prod(s)) for s in shapes]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])

    def loss(flat):
        p = dict(params)
        off = 0
        for n, s, k in zip(names, shapes, sizes, strict=True):
            p[n] = flat[off : off + k].reshape(s)
            off += k
        return nn.functional.cross_entropy(functional_call(net, p, (x,)), y)

    h = hessian(loss)(flat0).numpy()
    off = np.cumsum([0, *sizes])
    blocks = [slice(off[i], off[i + 1]) for i in range(len(sizes))]
    return h, blocks


def _exact_variances(h, blocks):
    """Per-draw variance of the block estimator and of the joint (one vector) estimator."""
    block, joint = [], []
    for b in blocks:
        hb = h[b, b]
        v_block = 2.0 * (np.sum(hb**2) - np.sum(np.diag(hb) ** 2))
        cross = np.sum(h[b, :] ** 2) - np.sum(hb**2)
        block.append(v_block)
        joint.append(v_block + cross)
    return np.array(block), np.array(joint)


@pytest.fixture(scope="module")
def exact():
    net = _tanh_net()
    x, y = _data()
    h, blocks = _exact_hessian(net, x, y)
    assert np.allclose(h, h.T, atol=1e-10)
    return net, x, y, h, blocks


def test_each_layer_is_probed_on_its_own_block(exact):
    from distortion.experiments.sensitivity import hessian_trace

    net, x, y, h, blocks = exact
    m = 400
    est = hessian_trace(
        net, (x, y), layers=LAYERS, n_draws=m, batch_size=25, seed=3, cache=False,
        progress=False,
    )  # fmt: skip
    traces = np.array([np.trace(h[b, b]) for b in blocks])
    var_block, var_joint = _exact_variances(h, blocks)
    # unbiased, and the reported standard error is sd over draws / sqrt(m)
    np.testing.assert_allclose(est.stderr, est.draws.std(axis=0, ddof=1) / np.sqrt(m))
    assert np.all(np.abs(est.trace - traces) < 4 * est.stderr), (est.trace, traces, est.stderr)
    # the spread per draw is that of the block estimator: the sample variance of m = 400
    # quadratic forms within a factor 1.5 of its exact value (its relative sd is ~0.1 here)
    s2 = est.draws.var(axis=0, ddof=1)
    assert np.all((s2 > var_block / 1.5) & (s2 < 1.5 * var_block)), (s2, var_block)
    # ... and not that of one vector over all layers, far larger for some layers here
    big = var_joint > 3 * var_block
    assert big.any(), (var_block, var_joint)
    assert np.all(s2[big] < np.sqrt(var_block * var_joint)[big]), (s2, var_block, var_joint)


def test_same_seed_same_draws_and_cache(exact, tmp_path):
    from distortion.experiments.sensitivity import hessian_trace

    net, x, y, *_ = exact
    kw = dict(layers=LAYERS, n_draws=4, seed=5, progress=False)
    a = hessian_trace(net, (x, y), cache_dir=tmp_path, batch_size=60, **kw)
    b = hessian_trace(net, (x, y), cache=False, batch_size=17, **kw)  # other batches
    np.testing.assert_allclose(a.draws, b.draws, rtol=1e-10)
    c = hessian_trace(net, (x, y), cache_dir=tmp_path, batch_size=60, **kw)
    np.testing.assert_array_equal(c.draws, a.draws)
    assert not np.array_equal(
        hessian_trace(net, (x, y), cache=False, **{**kw, "seed": 6}).draws, a.draws
    )


def test_cache_file_of_the_joint_probing_is_not_reused(exact, tmp_path):
    # A file written under the previous key (version 1, joint probing) must not be read.
    from distortion.experiments.sensitivity import _data_info, _model_hash, hessian_trace

    net, x, y, *_ = exact
    old = {
        "version": 1, "weights": _model_hash(net), "data": _data_info((x, y))[2],
        "layers": LAYERS, "n_draws": 3, "seed": 0,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    path = tmp_path / "hessian" / f"trace-{key[:24]}.npz"
    path.parent.mkdir(parents=True)
    stale = np.full((3, 3), 1e6)
    np.savez(path, key=np.array(key), n_params=np.array([54, 162, 24]), draws=stale,
             n_samples=len(y))  # fmt: skip
    est = hessian_trace(net, (x, y), layers=LAYERS, n_draws=3, cache_dir=tmp_path, progress=False)
    assert np.all(np.abs(est.draws) < 1e5)


def test_hawq_total_stderr_from_the_draws():
    rng = np.random.default_rng(0)
    common = rng.normal(size=(50, 1))
    draws = 5.0 + common + 0.3 * rng.normal(size=(50, 3))  # correlated across layers
    tr = HessianTrace(("a", "b", "c"), [10, 20, 40], draws)
    e = np.array([1.0, 2.0, 4.0])
    s = hawq_v2_sensitivity(tr, e)
    terms = draws * (e / np.array([10, 20, 40]))
    assert s.total() == pytest.approx(terms.mean(0).sum())
    assert s.total_stderr() == pytest.approx(terms.sum(1).std(ddof=1) / np.sqrt(50))
    # positively correlated layers: larger than the independent-layer sum
    assert s.total_stderr() > np.sqrt(np.sum(s.omega_stderr**2))
    np.testing.assert_allclose(s.omega_stderr, terms.std(0, ddof=1) / np.sqrt(50))
