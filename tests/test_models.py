"""Models: registry, CIFAR ResNet architecture, checkpoint loading, the uniform layer API."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from distortion.experiments.models import (
    MODELS,
    ShortcutA,
    forward_with_features,
    get_layer,
    get_spec,
    last_linear,
    layer_table,
    load_model,
    model_info,
    penultimate_features,
    quantizable_layers,
    state_dict_sha256,
)


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No shared folder, no DISTORTION_WEIGHTS, an empty torch hub cache."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DISTORTION_DATA", str(empty))
    monkeypatch.delenv("DISTORTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(empty / "torch"))
    return empty


def save_checkpoint(model: torch.nn.Module, path: Path, *, prefix: str = "module.") -> Path:
    """Save like the published CIFAR checkpoints: {"state_dict": {"module.<key>": ...}}."""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"best_prec1": 0.0, "state_dict": state}, path)
    return path


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------
def test_registry():
    assert set(MODELS) == {
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet50"
    }  # fmt: skip
    for name, spec in MODELS.items():
        assert spec.name == name
        assert spec.sha256_prefix in spec.checkpoint and spec.checkpoint.startswith(name + "-")
        assert spec.url.startswith("https://") and spec.url.endswith(spec.checkpoint)
        if spec.family == "cifar_resnet":
            assert spec.n_classes == 10 and spec.preprocessing.name == "cifar"
            assert "akamaster/pytorch_resnet_cifar10" in spec.url
        else:
            assert spec.n_classes == 1000 and spec.preprocessing.crop == 224
            import torchvision

            w = torchvision.models.get_weight(spec.torchvision_weights)
            assert w.url == spec.url
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20"):
        get_spec("resnet21")


# ---------------------------------------------------------------------------------------
# CIFAR ResNet architecture
# ---------------------------------------------------------------------------------------
def test_shortcut_option_a_matches_naive_padding():
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    out = ShortcutA(16, 32)(x).numpy()
    ref = np.zeros((2, 32, 4, 4))
    xn = x.numpy()
    for c in range(16):
        for i in range(4):
            for j in range(4):
                ref[:, c + 8, i, j] = xn[:, c, 2 * i, 2 * j]
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize(("name", "n_blocks"), [("resnet20", 3), ("resnet32", 5), ("resnet56", 9)])
def test_cifar_resnet_layers_in_forward_order(name: str, n_blocks: int):
    model = load_model(name, "random")
    expected = ["conv1"] + [
        f"layer{s}.{i}.conv{c}" for s in (1, 2, 3) for i in range(n_blocks) for c in (1, 2)
    ] + ["linear"]  # fmt: skip
    layers = quantizable_layers(model)
    assert [li.name for li in layers] == expected
    assert len(layers) == int(name[6:])  # ResNet-(6n+2): 6n+1 convolutions and 1 linear layer
    assert [li.kind for li in layers] == ["conv"] * (len(expected) - 1) + ["linear"]
    assert layers[0].weight_shape == (16, 3, 3, 3) and not layers[0].has_bias
    assert layers[-1].weight_shape == (10, 64) and layers[-1].has_bias
    for li in layers:
        assert tuple(get_layer(model, li.name).weight.shape) == li.weight_shape
    table = layer_table(model)
    assert list(table["name"]) == expected
    assert table["n_weights"].sum() == sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("weight") and "bn" not in n
    )


def test_random_weights_are_seeded_and_forward_shapes():
    a, b, c = (load_model("resnet20", "random", seed=s) for s in (0, 0, 1))
    assert state_dict_sha256(a) == state_dict_sha256(b) != state_dict_sha256(c)
    assert model_info(a).weights == "random(seed=0)" and model_info(a).weights_sha256 is None
    assert not a.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = forward_with_features(a, x)
        feats = a.features(x)  # the CIFAR ResNet's own feature method: an independent path
    assert out.features.shape == (3, 64) and out.logits.shape == (3, 10)
    torch.testing.assert_close(out.features, feats)
    torch.testing.assert_close(out.logits, a.linear(feats))
    torch.testing.assert_close(penultimate_features(a, x), feats)
    assert last_linear(a).name == "linear"


def test_models_pickle_and_deepcopy():
    model = load_model("resnet20", "random")
    clone = pickle.loads(pickle.dumps(model))
    assert state_dict_sha256(clone) == state_dict_sha256(model)
    assert model_info(copy.deepcopy(model)).name == "resnet20"


def test_features_keep_the_autograd_graph():
    model = load_model("resnet20", "random")
    out = forward_with_features(model, torch.randn(2, 3, 32, 32))
    out.logits[:, 0].sum().backward()
    assert get_layer(model, "layer2.1.conv1").weight.grad is not None


def test_get_layer_unknown_name():
    with pytest.raises(ValueError, match="no layer 'layer9.conv1'.*conv1, layer1.0.conv1"):
        get_layer(load_model("resnet20", "random"), "layer9.conv1")


# ---------------------------------------------------------------------------------------
# torchvision ResNets (random weights; the published ones need a network)
# ---------------------------------------------------------------------------------------
def test_torchvision_resnet18_uniform_interface():
    model = load_model("resnet18", "random")
    assert last_linear(model).name == "fc" and last_linear(model).module.out_features == 1000
    layers = quantizable_layers(model)
    assert len(layers) == 21  # conv1, 16 block convolutions, 3 downsample convolutions, fc
    names = [li.name for li in layers]
    assert names[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert names.index("layer2.0.downsample.0") == names.index("layer2.0.conv2") + 1
    assert names[-1] == "fc" and layers[-1].weight_shape == (1000, 512)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = forward_with_features(model, x)
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))  # torchvision's own layers
        h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
        ref = torch.flatten(model.avgpool(h), 1)
    torch.testing.assert_close(out.features, ref)
    torch.testing.assert_close(out.logits, model.fc(ref))


def test_torchvision_resnet_from_a_local_file(tmp_path: Path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=3)
    path = tmp_path / "finetuned.pth"
    torch.save(net.state_dict(), path)
    model = load_model("resnet18", path)
    assert last_linear(model).module.out_features == 3
    assert state_dict_sha256(model) == state_dict_sha256(net)
    assert model_info(model).n_classes == 3


def test_torchvision_checkpoint_of_another_depth(tmp_path: Path):
    # keys of a ResNet-50 (bottleneck blocks 3, 4, 6, 3); the values do not matter
    state = {"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(2, 2)}
    for stage, n in zip((1, 2, 3, 4), (3, 4, 6, 3), strict=True):
        for i in range(n):
            for c in (1, 2, 3):
                state[f"layer{stage}.{i}.conv{c}.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "r50.pth")
    with pytest.raises(
        ValueError, match="is a resnet50 but model is resnet18; pass --model resnet50"
    ):
        load_model("resnet18", tmp_path / "r50.pth")


# ---------------------------------------------------------------------------------------
# checkpoint files and their errors
# ---------------------------------------------------------------------------------------
def test_checkpoint_roundtrip_with_module_prefix(tmp_path: Path):
    src = load_model("resnet32", "random", seed=5)
    path = save_checkpoint(src, tmp_path / "mine.th")
    model = load_model("resnet32", path)
    assert state_dict_sha256(model) == state_dict_sha256(src)
    assert model_info(model).weights == str(path)
    assert len(model_info(model).weights_sha256) == 64
    plain = tmp_path / "plain.pt"
    torch.save(src.state_dict(), plain)  # a bare state dict without prefix loads as well
    assert state_dict_sha256(load_model("resnet32", plain)) == state_dict_sha256(src)


def test_checkpoint_of_another_depth_is_refused(tmp_path: Path):
    path = save_checkpoint(load_model("resnet32", "random"), tmp_path / "r32.th")
    with pytest.raises(
        ValueError,
        match=r"has 5 blocks per stage \(resnet32\) but model is resnet20 .*pass --model resnet32",
    ):
        load_model("resnet20", path)


def test_bad_checkpoint_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="--weights FILE"):
        load_model("resnet20", tmp_path / "missing.th")
    (tmp_path / "junk.th").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_model("resnet20", tmp_path / "junk.th")
    good = save_checkpoint(load_model("resnet20", "random"), tmp_path / "good.th")
    data = good.read_bytes()
    (tmp_path / "truncated.th").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_model("resnet20", tmp_path / "truncated.th")
    torch.save({"state_dict": {"linear.weight": torch.zeros(10, 64)}}, tmp_path / "other.th")
    with pytest.raises(ValueError, match="not a cifar resnet checkpoint"):
        load_model("resnet20", tmp_path / "other.th")
    torch.save([1, 2, 3], tmp_path / "list.th")
    with pytest.raises(ValueError, match="no state dict"):
        load_model("resnet20", tmp_path / "list.th")


def test_registry_file_name_with_wrong_content_fails_the_sha256_check(tmp_path: Path):
    path = save_checkpoint(
        load_model("resnet20", "random"), tmp_path / MODELS["resnet20"].checkpoint
    )
    with pytest.raises(ValueError, match="expected prefix 12fca82f"):
        load_model("resnet20", path)


def test_missing_weights_say_what_to_pass(no_weights: Path):
    with pytest.raises(FileNotFoundError, match="--weights FILE.*DISTORTION_WEIGHTS") as info:
        load_model("resnet20")
    assert "resnet20-12fca82f.th" in str(info.value)
    with pytest.raises(FileNotFoundError, match="--weights FILE.*DISTORTION_WEIGHTS"):
        load_model("resnet50")


def test_weights_env_file_and_hub_cache(no_weights: Path, tmp_path: Path, monkeypatch):
    src = load_model("resnet44", "random", seed=2)
    path = save_checkpoint(src, tmp_path / "r44.th")
    monkeypatch.setenv("DISTORTION_WEIGHTS", str(path))
    assert state_dict_sha256(load_model("resnet44")) == state_dict_sha256(src)
    monkeypatch.delenv("DISTORTION_WEIGHTS")
    import torchvision

    hub = no_weights / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), hub / "resnet18-f37072fd.pth")
    with pytest.raises(ValueError, match="expected prefix f37072fd"):  # found, then checked
        load_model("resnet18")


# ---------------------------------------------------------------------------------------
# the shared checkpoints
# ---------------------------------------------------------------------------------------
@pytest.mark.real_data
def test_shared_checkpoints_load_by_name(real_data: Path, monkeypatch):
    monkeypatch.setenv("DISTORTION_DATA", str(real_data))
    monkeypatch.delenv("DISTORTION_WEIGHTS", raising=False)
    for name in ("resnet20", "resnet56"):
        model = load_model(name)
        info = model_info(model)
        assert info.weights_sha256.startswith(MODELS[name].sha256_prefix)
        assert Path(info.weights).parent == real_data / "models" / "cifar10-resnet"
        n_params = sum(p.numel() for p in model.parameters())
        # 0.27 M and 0.85 M parameters, as in <shared>/models/cifar10-resnet/README.md
        assert round(n_params / 1e6, 2) == {"resnet20": 0.27, "resnet56": 0.85}[name]


@pytest.mark.real_data
def test_shared_resnet56_checkpoint_refused_as_resnet20(real_data: Path):
    path = real_data / "models" / "cifar10-resnet" / "resnet56-4bfd9763.th"
    with pytest.raises(
        ValueError, match=r"has 9 blocks per stage \(resnet56\) but model is resnet20"
    ):
        load_model("resnet20", path)


@pytest.mark.real_data
def test_weights_env_folder(real_data: Path, no_weights: Path, monkeypatch):
    monkeypatch.setenv("DISTORTION_WEIGHTS", str(real_data / "models" / "cifar10-resnet"))
    assert model_info(load_model("resnet20")).weights_sha256.startswith("12fca82f")
