"""Any PyTorch classifier: layer discovery and per-sample Grams of every supported layer type
(grouped/depthwise Conv1d/2d, Linear on sequences, the packed and separate projections of
nn.MultiheadAttention, nn.TransformerEncoderLayer), tied weights, unsupported types, and the
data forms a PyTorch user has (DataLoader, TensorDataset, Dataset, (x, y)).

Every Gram is checked against a naive ``torch.func`` reference (vmap over samples of jacrev
with respect to the weight, through ``functional_call`` of the whole model), in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
nn = torch.nn

from distortion.experiments.models import get_layer, quantizable_layers  # noqa: E402
from distortion.experiments.sensitivity import gradient_grams, resolve_quantizable  # noqa: E402

RTOL = 1e-10


def reference_grams(net, x, parameters):
    """Per-sample Jacobians of the logits w.r.t. each named parameter (vmap of jacrev)."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}

    def f(w, xi):
        p = dict(params)
        p.update(w)
        return functional_call(net, (p, buffers), (xi[None],))[0]

    with warnings.catch_warnings():  # no batching rule for CPU flash attention: slow, exact
        warnings.simplefilter("ignore", UserWarning)
        jac = vmap(jacrev(f), in_dims=(None, 0))({n: params[n] for n in parameters}, x)
    out = []
    for n in parameters:
        j = jac[n].reshape(x.shape[0], jac[n].shape[1], -1).double()  # (N, K, n)
        out.append(torch.einsum("nki,nji->nkj", j, j).numpy())
    return np.stack(out, axis=1)


def grams_of(net, data, **kw):
    kw = {"cache": False, "progress": False, "n_realizations": 0, **kw}
    return gradient_grams(net, data, **kw)


def check_against_reference(net, x, input_shape, **kw):
    """Grams of every discovered layer equal the torch.func reference; returns the Grams."""
    g = grams_of(net, x, **kw)
    infos = {li.name: li for li in quantizable_layers(net, input_shape=input_shape)}
    ref = reference_grams(net, x, [infos[n].parameter for n in g.layer_names])
    scale = np.abs(ref).max(axis=(2, 3), keepdims=True)
    assert np.all(scale > 0), "a layer with a zero Jacobian tests nothing"
    rel = np.abs(g.grams - ref) / scale
    assert rel.max() < RTOL, dict(zip(g.layer_names, rel.max(axis=(0, 2, 3)), strict=True))
    with torch.no_grad():  # the recorded forward pass is the model's (to rounding)
        np.testing.assert_allclose(g.logits, net(x).numpy(), rtol=1e-12, atol=1e-12)
    return g


def _randomize_norms(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


def tiny_vit(num_layers=1):
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=num_layers, num_heads=2, hidden_dim=16,
        mlp_dim=32, num_classes=10,
    )  # fmt: skip
    nn.init.normal_(net.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return net.double().eval()


class SeqClassifier(nn.Module):
    """Conv1d stem -> nn.TransformerEncoder -> mean over time -> Linear head."""

    def __init__(self, batch_first: bool, n_classes: int = 5) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.stem = nn.Conv1d(3, 16, 3, padding=1)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, n_classes)

    def forward(self, x):
        h = self.stem(x)  # (B, E, T)
        h = h.transpose(1, 2) if self.batch_first else h.permute(2, 0, 1)
        return self.head(self.encoder(h).mean(1 if self.batch_first else 0))


def seq_classifier(batch_first):
    torch.manual_seed(1)
    return SeqClassifier(batch_first).double().eval()


def images(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).double()


# ----------------------------------------------------------------------------- references
def test_mobilenet_v3_grouped_and_depthwise_convs_match_reference():
    torch.manual_seed(0)
    net = _randomize_norms(torchvision.models.mobilenet_v3_small(num_classes=10)).double().eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert any(m.groups == m.in_channels > 1 for m in convs)  # depthwise convs are there
    g = check_against_reference(net, images(2), (1, 3, 32, 32))
    assert len(g.layer_names) == len(convs) + 2  # every conv and both linear layers


def test_resnet18_matches_reference():
    torch.manual_seed(0)
    net = _randomize_norms(torchvision.models.resnet18(num_classes=10)).double().eval()
    g = check_against_reference(net, images(2), (1, 3, 32, 32), layers=["conv1", "fc"])
    assert g.layer_names == ("conv1", "fc")
    # and the last block, with a stride-2 downsampling 1x1 conv
    check_against_reference(
        net, images(2), (1, 3, 32, 32), layers=["layer4.0.conv1", "layer4.0.downsample.0"]
    )


def test_vit_every_weight_matrix_is_analysed_and_matches_reference():
    net = tiny_vit(num_layers=2)
    matrices = {n for n, p in net.named_parameters() if p.ndim >= 2 and "weight" in n}
    assert len(matrices) == 10
    infos = quantizable_layers(net)
    assert {li.parameter for li in infos} == matrices
    names = [li.name for li in infos]
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj" in names
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" in names
    assert names.index("encoder.layers.encoder_layer_0.self_attention.in_proj") < names.index(
        "encoder.layers.encoder_layer_0.self_attention.out_proj"
    )
    g = check_against_reference(tiny_vit(num_layers=1), images(3), (1, 3, 32, 32))
    assert g.weight_shapes[1] == (48, 16)  # the packed (3E, E) in-projection


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_on_sequences_matches_reference(batch_first):
    net = seq_classifier(batch_first)
    x = torch.randn(3, 3, 7, generator=torch.Generator().manual_seed(2)).double()
    g = check_against_reference(net, x, (1, 3, 7))
    assert g.layer_names == (
        "stem",
        *[
            f"encoder.layers.{i}.{n}"
            for i in range(2)
            for n in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")
        ],
        "head",
    )
    assert g.layer_kinds[0] == "conv" and set(g.layer_kinds[1:]) == {"linear"}


class CrossAttention(nn.Module):
    """Query from one branch, key/value from another: the three row blocks of the packed
    in-projection see different inputs (``shared_kv``: key is value); ``kdim`` gives the
    separate q/k/v projection weights."""

    def __init__(self, shared_kv: bool, kdim: int | None = None) -> None:
        super().__init__()
        self.shared_kv, self.kdim = shared_kv, kdim
        self.stem = nn.Conv1d(2, 8, 3, padding=1, groups=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.kv = nn.Linear(8, kdim or 8)
        self.vv = nn.Linear(8, kdim or 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.stem(x).transpose(1, 2)  # (B, T, 8)
        k = torch.tanh(self.kv(h))
        v = k if self.shared_kv else torch.tanh(self.vv(h))
        if self.kdim is None:
            out, _ = self.attn(h, k, v, need_weights=not self.shared_kv)
        else:  # called with keywords
            out, _ = self.attn(query=h, key=k, value=v, need_weights=False)
        return self.head(out.mean(1))


@pytest.mark.parametrize(("shared_kv", "kdim"), [(True, None), (False, None), (False, 6)])
def test_cross_attention_projections_match_reference(shared_kv, kdim):
    torch.manual_seed(3)
    net = CrossAttention(shared_kv, kdim).double().eval()
    x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(4)).double()
    g = check_against_reference(net, x, (1, 2, 5))
    proj = ["attn.in_proj"] if kdim is None else ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    assert [n for n in g.layer_names if n.startswith("attn.")] == [*proj, "attn.out_proj"]


def test_conv1d_strided_dilated_and_circular_padding_match_reference():
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2, padding_mode="circular", groups=2),
        nn.ReLU(),
        nn.Conv1d(6, 6, 4, padding="same", groups=6, bias=False),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    net(torch.randn(1, 4, 11))
    net = net.double().eval()
    x = torch.randn(4, 4, 11, generator=torch.Generator().manual_seed(6)).double()
    check_against_reference(net, x, (1, 4, 11))


def test_conv3d_grouped_dilated_matches_reference():
    torch.manual_seed(13)
    net = nn.Sequential(
        nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), dilation=(1, 1, 2), padding=1, groups=2),
        nn.Tanh(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double().eval()
    x = torch.randn(3, 2, 4, 5, 6, generator=torch.Generator().manual_seed(14)).double()
    check_against_reference(net, x, (1, 2, 4, 5, 6))


# ----------------------------------------------------------------------------- tied / unsupported
class Scale(nn.Module):
    """A custom module with a weight: an unsupported type."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.weight


class Tied(nn.Module):
    """A Linear weight used through two modules (tied), a module under two names, and a
    custom module with a weight (unsupported)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc2.weight = self.fc1.weight  # tied: the same Parameter
        self.scale = Scale(6)
        self.head = nn.Linear(6, 3)
        self.head_alias = self.head  # the same module under two names

    def forward(self, x):
        return self.head(self.scale(self.fc2(torch.tanh(self.fc1(x)))))


def test_tied_weights_are_reported_and_counted_once():
    torch.manual_seed(7)
    net = Tied().double().eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(8)).double()
    with pytest.warns(UserWarning, match="tied weights"), pytest.warns(UserWarning, match="Scale"):
        g = grams_of(net, x)
    assert g.layer_names == ("fc1", "head")
    assert g.meta["tied"] == {"fc1": ["fc2"], "head": ["head_alias"]}
    assert g.meta["skipped"] == {"scale": "it is a Scale"}
    # the Jacobian w.r.t. the shared tensor is the total one, through both uses
    ref = reference_grams(net, x, ["fc1.weight", "head.weight"])
    np.testing.assert_allclose(g.grams, ref, rtol=RTOL, atol=1e-14)
    infos = quantizable_layers(net, input_shape=(1, 6))
    assert [(li.name, li.tied) for li in infos] == [("fc1", ("fc2",)), ("head", ("head_alias",))]
    # the other name maps to the one layer, never twice
    with pytest.warns(UserWarning, match="tied"):
        assert resolve_quantizable(net, ["fc2", "fc1"], x) == ["fc1"]


def test_unsupported_types_skipped_with_a_note_or_named_in_the_error():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 8))
    net = nn.Sequential(nn.ConvTranspose2d(3, 3, 3, padding=1), *net, nn.PReLU(), nn.Linear(8, 3))
    net = net.double().eval()
    x = images(2)
    with pytest.warns(UserWarning, match=r"skips 2 layer.*ConvTranspose2d.*PReLU"):
        names = resolve_quantizable(net, "all", x)
    assert names == ["1", "3", "5"]
    with pytest.raises(ValueError, match="ConvTranspose2d"):
        resolve_quantizable(net, ["0", "1"], x)
    with pytest.raises(ValueError, match="unknown layer"):
        resolve_quantizable(net, ["nope"], x)


def test_a_layer_whose_input_merges_the_batch_is_unsupported():
    class Merged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(12, 3)

        def forward(self, x):  # (B, 3, 4) -> (B*3, 4): per-sample rows not separable
            b = x.shape[0]
            return self.head(self.fc(x.reshape(-1, 4)).reshape(b, 12))

    net = Merged().double().eval()
    x = torch.randn(2, 3, 4).double()
    with pytest.raises(ValueError, match="merges the batch"):
        resolve_quantizable(net, ["fc"], x)
    assert resolve_quantizable(net, "last", x) == ["head"]


def test_get_layer_gives_the_attention_projection_weight():
    net = tiny_vit()
    name = "encoder.layers.encoder_layer_0.self_attention"
    layer = get_layer(net, f"{name}.in_proj")
    assert layer.weight is net.get_submodule(name).in_proj_weight
    assert get_layer(net, f"{name}.out_proj").weight is net.get_submodule(name).out_proj.weight
    with pytest.raises(ValueError, match="no layer"):
        get_layer(net, f"{name}.q_proj")  # packed: there is no separate q projection


# ----------------------------------------------------------------------------- data forms
def test_every_data_form_gives_the_same_grams():
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    net = seq_classifier(batch_first=True)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(11, 3, 7, generator=g).double()
    y = torch.randint(0, 5, (11,), generator=g)

    class Items(Dataset):
        def __len__(self):
            return 11

        def __getitem__(self, i):
            return x[i], y[i]

    forms = {
        "pair": (x, y),
        "tensor_dataset": TensorDataset(x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=3),
        "dataset": Items(),
        "loader_of_dataset": DataLoader(Items(), batch_size=5),
    }
    out = {k: grams_of(net, d, batch_size=4) for k, d in forms.items()}
    for k, gk in out.items():
        np.testing.assert_array_equal(gk.grams, out["pair"].grams, err_msg=k)
        np.testing.assert_array_equal(gk.labels, y.numpy(), err_msg=k)
    unlabelled = grams_of(net, DataLoader(x, batch_size=4), batch_size=4)
    assert unlabelled.labels is None
    np.testing.assert_array_equal(unlabelled.grams, out["pair"].grams)


def test_unsupported_data_forms_are_clear_errors():
    from torch.utils.data import DataLoader, TensorDataset

    from distortion.estimator import AccuracyLossEstimator

    net = seq_classifier(batch_first=True)
    x = torch.randn(4, 3, 7).double()
    est = AccuracyLossEstimator(progress=False)
    for bad in ({"x": x}, "data", [x, x, x], 3):
        with pytest.raises(ValueError, match="DataLoader.*TensorDataset"):
            est.fit_model(net, bad)
    shuffled = DataLoader(TensorDataset(x, torch.zeros(4, dtype=torch.long)), shuffle=True)
    with pytest.raises(ValueError, match="shuffle"):
        est.fit_model(net, shuffled)
    triples = DataLoader(TensorDataset(x, x, x), batch_size=2)
    with pytest.raises(ValueError, match=r"\(x, y\) pairs"):
        est.fit_model(net, triples)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18", "vit"])
def test_estimator_and_measure_end_to_end_on_torchvision_models(arch, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from distortion.estimator import AccuracyLossEstimator
    from distortion.experiments.measure import measure
    from distortion.quantize import UniformQuantizer

    torch.manual_seed(11)
    if arch == "vit":
        net = tiny_vit().float()
    else:
        net = getattr(torchvision.models, arch)(num_classes=4).eval()  # K x 11M for resnet18
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        y = net(x).argmax(1)  # labels the float model gets right
    est = AccuracyLossEstimator(
        UniformQuantizer(8), n_realizations=0, progress=False, cache_dir=tmp_path
    )  # no error draws (R x 11M for resnet18)
    est.fit_model(net, (x, y))
    assert len(est.layers_) == len(quantizable_layers(net))
    pred = est.predict(bits=[6, 8])
    assert list(pred.bits) == [6, 8] and np.all(np.isfinite(pred.flip_rate))
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    m = measure(net, loader, UniformQuantizer(8), progress=False)
    assert m.n == 6 and 0.0 <= m.flip_rate <= 1.0
    assert set(m.layers) == set(est.layers_)
