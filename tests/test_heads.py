"""Several heads on one backbone and multi-label sigmoid outputs (distortion.experiments.heads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distortion.experiments.heads import OutputSpec, SelectOutput, compare_outputs
from distortion.experiments.measure import measure
from distortion.experiments.sensitivity import gradient_grams
from distortion.quantize import UniformQuantizer


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(6 * 16, 16), nn.ReLU())  # fmt: skip
        self.cls = nn.Linear(16, 5)
        self.tags = nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(x)
        return {"cls": self.cls(h), "tags": self.tags(h)}


@pytest.fixture(scope="module")
def net_data():
    net = _TwoHeads().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, 4, 4, generator=g)
    with torch.no_grad():
        out = net(x)
    y_cls = out["cls"].argmax(1).numpy().copy()
    y_cls[:10] = (y_cls[:10] + 1) % 5  # some wrong decisions
    y_tags = (out["tags"].numpy() > 0).astype(np.int64)
    return net, x, y_cls, y_tags


def test_select_output_is_the_head_and_labels_decide_by_sign(net_data):
    net, x, _, _ = net_data
    with torch.no_grad():
        out = net(x)
        torch.testing.assert_close(SelectOutput(net, head="cls")(x), out["cls"])
        for lab in range(3):
            z2 = SelectOutput(net, head="tags", label=lab)(x)
            assert z2.shape == (60, 2)
            np.testing.assert_array_equal(
                z2.argmax(1).numpy(), (out["tags"][:, lab] > 0).numpy().astype(int)
            )


def test_bad_heads_and_labels(net_data):
    net, x, _, _ = net_data
    with pytest.raises(ValueError, match="no head"):
        SelectOutput(net, head="nope")(x)
    with pytest.raises(ValueError, match="head="):
        SelectOutput(net)(x)
    with pytest.raises(ValueError, match="label"):
        SelectOutput(net, head="tags", label=3)(x)
    with pytest.raises(ValueError, match="SelectOutput"):
        gradient_grams(net, x, cache=False, progress=False)


def test_two_outputs_of_one_network_never_share_a_cache(tmp_path, net_data):
    """Same weights, same labels, different heads: different Grams (the key has the outputs)."""
    net, x, _, y_tags = net_data
    y = torch.as_tensor(y_tags[:, 0])
    kw = {"cache_dir": tmp_path, "progress": False, "n_realizations": 0}
    a = gradient_grams(SelectOutput(net, head="tags", label=0), (x, y), **kw)
    b = gradient_grams(SelectOutput(net, head="tags", label=1), (x, y), **kw)
    assert a.key != b.key
    assert not np.allclose(a.grams, b.grams)


def test_compare_outputs_predicts_and_measures_each_output(tmp_path, net_data):
    net, x, y_cls, y_tags = net_data
    outputs = [OutputSpec("cls", y_cls, head="cls")] + [
        OutputSpec(f"tag{i}", y_tags[:, i], head="tags", label=i) for i in range(3)
    ]
    qs = [UniformQuantizer(4), UniformQuantizer(6, granularity="channel")]
    res = compare_outputs(net, x, outputs, qs, cache_dir=tmp_path)
    t = res.to_frame()
    assert len(t) == 8 and set(t.output) == {"cls", "tag0", "tag1", "tag2"}
    assert t.predicted_flip_rate_low.le(t.predicted_flip_rate_high).all()
    # the measured column is the measurement of that output alone
    row = t[(t.output == "tag1") & (t.bits == 4)].iloc[0]
    m = measure(SelectOutput(net, head="tags", label=1), (x, torch.as_tensor(y_tags[:, 1])),
                qs[0], progress=False)  # fmt: skip
    assert row.measured_flip_rate == m.flip_rate
    assert 0.0 <= res.coverage() <= 1.0


def test_compare_outputs_checks_its_inputs(net_data):
    net, x, y_cls, _ = net_data
    with pytest.raises(ValueError, match="outputs is empty"):
        compare_outputs(net, x, [], [UniformQuantizer(4)])
    with pytest.raises(ValueError, match="shape"):
        compare_outputs(net, x, [OutputSpec("cls", y_cls[:5], head="cls")], [UniformQuantizer(4)])
    with pytest.raises(ValueError, match="unique"):
        compare_outputs(
            net, x, [OutputSpec("a", y_cls, "cls"), OutputSpec("a", y_cls, "cls")],
            [UniformQuantizer(4)],
        )  # fmt: skip
