r"""The networks: CIFAR ResNet-20/32/44/56/110, torchvision ImageNet ResNet-18/50, checkpoints.

One registry, :data:`MODELS`, names every supported network with its checkpoint file, a
public download URL, the input preprocessing and the number of classes;
:func:`load_model` builds one and loads its weights (a file, ``$DISTORTION_WEIGHTS``,
``<shared>/models/*/``, or a download when asked).

Every model is then used through the same four functions, which the quantization and
gradient code of the other modules relies on:

- :func:`penultimate_features` / :func:`forward_with_features`: the input ``x`` of the last
  linear layer (after global pooling), and the logits ``z = W x + b``;
- :func:`last_linear`: that layer, with its name (``"linear"`` for CIFAR ResNets, ``"fc"``
  for torchvision ResNets);
- :func:`quantizable_layers`: every convolution and linear layer in the order the forward
  pass runs them (batch-norm layers are not quantized);
- :func:`get_layer`: a layer by name (``model.get_submodule`` with a clear error).

A layer's weight is ``get_layer(model, info.name).weight`` (shape ``info.weight_shape``).

torch is imported only when a model is built or used: the module-level names that need it
(:class:`CifarResNet`, :class:`BasicBlock`, :class:`ShortcutA`) are created on first access.

References
----------
.. [1] K. He, X. Zhang, S. Ren and J. Sun, "Deep residual learning for image recognition",
   CVPR 2016 (section 4.2: the CIFAR-10 networks, shortcut option A).
.. [2] Y. Idelbayev, "Proper ResNet implementation for CIFAR10/CIFAR100 in PyTorch",
   https://github.com/akamaster/pytorch_resnet_cifar10 (the checkpoints).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import pandas as pd

from distortion.experiments import _paths
from distortion.experiments.data import (
    CIFAR_PREPROCESSING,
    IMAGENET_PREPROCESSING,
    Preprocessing,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "MODELS",
    "BasicBlock",  # noqa: F822 (created on first access, see __getattr__)
    "CifarResNet",  # noqa: F822 (created on first access, see __getattr__)
    "FeaturesAndLogits",
    "LayerInfo",
    "ModelInfo",
    "ModelSpec",
    "NamedLayer",
    "ShortcutA",  # noqa: F822 (created on first access, see __getattr__)
    "find_weights",
    "forward_with_features",
    "get_layer",
    "get_spec",
    "last_linear",
    "layer_table",
    "load_model",
    "model_info",
    "penultimate_features",
    "quantizable_layers",
    "state_dict_sha256",
]

_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


# ---------------------------------------------------------------------------------------
# the CIFAR ResNet (built lazily, so that importing this module does not import torch)
# ---------------------------------------------------------------------------------------
def _build_cifar_classes() -> dict[str, type]:
    import torch.nn.functional as F
    from torch import nn

    class ShortcutA(nn.Module):
        """Shortcut "option A" of [1]: subsample by 2 in space, zero-pad the new channels."""

        def __init__(self, in_planes: int, planes: int) -> None:
            super().__init__()
            self.pad = (planes - in_planes) // 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    class BasicBlock(nn.Module):
        """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

        def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            if stride != 1 or in_planes != planes:
                self.shortcut: nn.Module = ShortcutA(in_planes, planes)
            else:
                self.shortcut = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + self.shortcut(x))

    class CifarResNet(nn.Module):
        """ResNet-(6n+2) for 32x32 images [1]: 16-32-64 channels, n blocks per stage.

        Parameter names match the checkpoints of [2] without their ``module.`` prefix.
        """

        def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
            super().__init__()
            if depth < 8 or (depth - 2) % 6:
                raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, ...), got {depth}")
            self.depth = depth
            self.blocks_per_stage = n = (depth - 2) // 6
            self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.layer1 = self._stage(16, 16, n, 1)
            self.layer2 = self._stage(16, 32, n, 2)
            self.layer3 = self._stage(32, 64, n, 2)
            self.linear = nn.Linear(64, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    nn.init.kaiming_normal_(m.weight)

        @staticmethod
        def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
            blocks = [BasicBlock(in_planes, planes, stride)]
            blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
            return nn.Sequential(*blocks)

        def features(self, x: torch.Tensor) -> torch.Tensor:
            """Penultimate features, shape (B, 64): global average of the last stage."""
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer3(self.layer2(self.layer1(out)))
            return F.adaptive_avg_pool2d(out, 1).flatten(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.features(x))

    classes = {"ShortcutA": ShortcutA, "BasicBlock": BasicBlock, "CifarResNet": CifarResNet}
    for cls in classes.values():  # picklable as distortion.experiments.models.<name>
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    globals().update(classes)
    return classes


_LAZY = ("BasicBlock", "CifarResNet", "ShortcutA")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _build_cifar_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cifar_resnet(depth: int, n_classes: int) -> nn.Module:
    cls = globals().get("CifarResNet") or _build_cifar_classes()["CifarResNet"]
    return cls(depth, n_classes)


def _torchvision_resnet(arch: str, n_classes: int) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, arch)(weights=None, num_classes=n_classes)


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A supported network: how to build it, where its weights come from, what it expects.

    Parameters
    ----------
    name : str
        Registry key, e.g. ``"resnet20"``.
    family : {"cifar_resnet", "torchvision_resnet"}
    depth : int
    n_classes : int
        Outputs of the published weights.
    dataset : str
        What the published weights were trained on (``"cifar10"``, ``"imagenet"``).
    preprocessing : Preprocessing
        Input preprocessing the weights expect.
    checkpoint : str
        File name of the published weights (``<name>-<sha256 prefix>.<ext>``).
    sha256_prefix : str
        First hex digits of the file's sha256, checked when a file of that name is loaded.
    url : str
        Public download URL.
    torchvision_weights : str or None
        torchvision weights enum, e.g. ``"ResNet18_Weights.IMAGENET1K_V1"``.
    reference_top1 : float
        Published top-1 accuracy (%) on the test / validation set.
    constructor : callable
        ``constructor(n_classes) -> nn.Module`` with freshly initialized weights.
    """

    name: str
    family: Literal["cifar_resnet", "torchvision_resnet"]
    depth: int
    n_classes: int
    dataset: str
    preprocessing: Preprocessing
    checkpoint: str
    sha256_prefix: str
    url: str
    torchvision_weights: str | None
    reference_top1: float
    constructor: Callable[[int], Any] = field(repr=False)

    def build(self, n_classes: int | None = None) -> nn.Module:
        """Return the network with random weights (``n_classes`` outputs, default the spec's)."""
        return self.constructor(self.n_classes if n_classes is None else int(n_classes))


def _cifar_spec(depth: int, sha: str, top1: float) -> ModelSpec:
    name = f"resnet{depth}"
    return ModelSpec(
        name=name, family="cifar_resnet", depth=depth, n_classes=10, dataset="cifar10",
        preprocessing=CIFAR_PREPROCESSING, checkpoint=f"{name}-{sha}.th", sha256_prefix=sha,
        url=f"{_AKAMASTER}{name}-{sha}.th", torchvision_weights=None, reference_top1=top1,
        constructor=partial(_cifar_resnet, depth),
    )  # fmt: skip


def _tv_spec(depth: int, sha: str, enum: str, top1: float) -> ModelSpec:
    name = f"resnet{depth}"
    return ModelSpec(
        name=name, family="torchvision_resnet", depth=depth, n_classes=1000, dataset="imagenet",
        preprocessing=IMAGENET_PREPROCESSING, checkpoint=f"{name}-{sha}.pth", sha256_prefix=sha,
        url=f"https://download.pytorch.org/models/{name}-{sha}.pth", torchvision_weights=enum,
        reference_top1=top1, constructor=partial(_torchvision_resnet, name),
    )  # fmt: skip


#: Supported networks. CIFAR top-1 from [2] (test error 8.27, 7.37, 6.90, 6.61, 6.32 %);
#: ImageNet top-1 from torchvision's weights metadata (``IMAGENET1K_V1``).
MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _cifar_spec(20, "12fca82f", 91.73),
        _cifar_spec(32, "d509ac18", 92.63),
        _cifar_spec(44, "014dd654", 93.10),
        _cifar_spec(56, "4bfd9763", 93.39),
        _cifar_spec(110, "1d1ed7c2", 93.68),
        _tv_spec(18, "f37072fd", "ResNet18_Weights.IMAGENET1K_V1", 69.758),
        _tv_spec(50, "0676ba61", "ResNet50_Weights.IMAGENET1K_V1", 76.130),
    )
}


def get_spec(name: str) -> ModelSpec:
    """Return ``MODELS[name]``, or raise a ValueError listing the names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


# ---------------------------------------------------------------------------------------
# loading weights
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from (attached to it as ``model.distortion_info``)."""

    name: str
    spec: ModelSpec = field(repr=False)
    weights: str  # the file, or "random(seed=0)"
    weights_sha256: str | None  # sha256 of the file (hex); None for random weights
    n_classes: int

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable summary (for provenance)."""
        return {
            "model": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "n_classes": self.n_classes,
        }


def model_info(model: nn.Module) -> ModelInfo | None:
    """Return the :class:`ModelInfo` that :func:`load_model` attached, or None."""
    info = getattr(model, "distortion_info", None)
    return info if isinstance(info, ModelInfo) else None


def _what_to_pass(spec: ModelSpec) -> str:
    return (
        f"pass --weights FILE (weights=FILE), set DISTORTION_WEIGHTS to the file or its folder, "
        f"or download it (--download, download=True) from {spec.url}"
    )


def find_weights(name: str, *, download: bool = False) -> Path:
    """Return the weights file of a registered model, searching the usual places.

    In order: ``$DISTORTION_WEIGHTS`` when it names a file; the checkpoint file name in
    ``$DISTORTION_WEIGHTS`` (a folder), ``<shared>/models/*/`` and the torch hub cache
    (``~/.cache/torch/hub/checkpoints``); else, with ``download=True``, a download into the
    torch hub cache (sha256 prefix checked).

    Raises
    ------
    FileNotFoundError
        Nothing found and no download asked; the message says what to pass.
    """
    spec = get_spec(name)
    env = os.environ.get("DISTORTION_WEIGHTS")
    if env and Path(env).expanduser().is_file():
        return Path(env).expanduser()
    dirs = _paths.weights_search_dirs() + [_hub_checkpoints()]
    for d in dirs:
        if (d / spec.checkpoint).is_file():
            return d / spec.checkpoint
    if download:
        import torch

        dest = _hub_checkpoints() / spec.checkpoint
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(spec.url, str(dest), hash_prefix=spec.sha256_prefix)
        except Exception as exc:  # no network, bad hash, read-only cache
            raise FileNotFoundError(
                f"could not download {spec.url} ({exc}); pass --weights FILE or set "
                "DISTORTION_WEIGHTS"
            ) from exc
        return dest
    raise FileNotFoundError(
        f"no weights for {name}: {spec.checkpoint} is not in "
        f"{', '.join(str(d) for d in dirs)}; {_what_to_pass(spec)}"
    )


def _hub_checkpoints() -> Path:
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        return Path(torch_home).expanduser() / "hub" / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg).expanduser() / "torch" / "hub" / "checkpoints"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read weights file {str(path)!r} with torch.load(weights_only=True): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"weights file {str(path)!r} holds no state dict (a dict of tensors, or a dict with "
            "a 'state_dict' entry)"
        )
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


_TV_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


def _checkpoint_depth(spec: ModelSpec, state: dict[str, Any]) -> int | None:
    """Depth the checkpoint was saved from, or None when it cannot be told."""
    blocks = []
    for stage in range(1, 5 if spec.family == "torchvision_resnet" else 4):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(ids) + 1 if ids else 0)
    if spec.family == "cifar_resnet":
        return 6 * blocks[0] + 2 if blocks[0] and len(set(blocks)) == 1 else None
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in state)
    return _TV_DEPTHS.get((tuple(blocks), bottleneck))


def _check_architecture(spec: ModelSpec, state: dict[str, Any], path: Path) -> None:
    depth = _checkpoint_depth(spec, state)
    if depth == spec.depth:
        return
    if depth is None:
        raise ValueError(
            f"weights file {str(path)!r} is not a {spec.family.replace('_', ' ')} checkpoint "
            f"(keys such as {sorted(state)[:3]}); pass the weights of {spec.name}"
        )
    if spec.family == "cifar_resnet":
        raise ValueError(
            f"checkpoint {str(path)!r} has {(depth - 2) // 6} blocks per stage (resnet{depth}) "
            f"but model is {spec.name} ({(spec.depth - 2) // 6} blocks per stage); "
            f"pass --model resnet{depth}"
        )
    raise ValueError(
        f"checkpoint {str(path)!r} is a resnet{depth} but model is {spec.name}; "
        f"pass --model resnet{depth}"
    )


def load_model(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    device: str = "cpu",
    download: bool = False,
    n_classes: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a registered network, load its weights, and return it in eval mode.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS` (``"resnet20"``, ``"resnet56"``, ``"resnet18"``, ...).
    weights : path, ``"random"`` or None
        A checkpoint file (``torch.load(weights_only=True)``: a state dict, or a dict with
        a ``state_dict`` entry; a ``module.`` prefix is stripped); ``"random"`` for fresh
        weights drawn with ``seed``; None to search with :func:`find_weights`.
    device : str
        Where to put the model.
    download : bool
        Download the published weights when not found locally (needs a network).
    n_classes : int, optional
        Outputs of a random-weights model (default: the spec's). With a file, the number
        of outputs is read from the file.
    seed : int
        Seed of the random initialization (``weights="random"``).

    Returns
    -------
    torch.nn.Module
        In eval mode, with a :class:`ModelInfo` as ``model.distortion_info``.

    Raises
    ------
    FileNotFoundError
        No weights file; the message says to pass ``--weights FILE`` or set
        ``DISTORTION_WEIGHTS``.
    ValueError
        An unreadable file, a sha256 mismatch, or a checkpoint of another architecture
        (e.g. "checkpoint has 9 blocks per stage (resnet56) but model is resnet20; pass
        --model resnet56").
    """
    import torch

    spec = get_spec(name)
    if isinstance(weights, str) and weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.build(n_classes)
        info = ModelInfo(name, spec, f"random(seed={seed})", None, _out_features(model))
        return _finish(model, info, device)
    if weights is None:
        path = find_weights(name, download=download)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"weights file {str(path)!r} does not exist; pass --weights FILE with the "
                f"{spec.name} checkpoint ({spec.checkpoint}) or set DISTORTION_WEIGHTS"
            )
    sha = _file_sha256(path)
    if path.name == spec.checkpoint and not sha.startswith(spec.sha256_prefix):
        raise ValueError(
            f"weights file {str(path)!r} has sha256 {sha[:16]}..., not the expected prefix "
            f"{spec.sha256_prefix}: the file is corrupt or not the published one; "
            f"{_what_to_pass(spec)}"
        )
    state = _read_state_dict(path)
    _check_architecture(spec, state, path)
    head = "linear.weight" if spec.family == "cifar_resnet" else "fc.weight"
    if head not in state or state[head].ndim != 2:
        raise ValueError(f"weights file {str(path)!r} has no {head!r} matrix")
    model = spec.build(state[head].shape[0])
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"weights file {str(path)!r} does not fit {spec.name}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]}"
        )
    model.load_state_dict(state, strict=False)
    info = ModelInfo(name, spec, str(path), sha, _out_features(model))
    return _finish(model, info, device)


def _out_features(model: nn.Module) -> int:
    return int(last_linear(model).module.out_features)


def _finish(model: nn.Module, info: ModelInfo, device: str) -> nn.Module:
    model.distortion_info = info
    return model.to(device).eval()


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 (hex) of a model's state dict: names, dtypes, shapes and bytes of every tensor."""
    import torch

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# the uniform model interface
# ---------------------------------------------------------------------------------------
class NamedLayer(NamedTuple):
    """A layer and its dotted name in ``model.named_modules()``."""

    name: str
    module: Any  # nn.Module


class FeaturesAndLogits(NamedTuple):
    """Penultimate features, shape (B, d), and logits, shape (B, K), of one forward pass."""

    features: Any  # torch.Tensor
    logits: Any  # torch.Tensor


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer: its name, kind and weight shape.

    The weight is ``get_layer(model, name).weight``: (out, in, kh, kw) for a convolution,
    (out, in) for a linear layer.
    """

    name: str
    kind: Literal["conv", "linear"]
    weight_shape: tuple[int, ...]
    has_bias: bool

    def n_weights(self) -> int:
        """Number of weight entries."""
        n = 1
        for s in self.weight_shape:
            n *= s
        return n


def last_linear(model: nn.Module) -> NamedLayer:
    """Return the last ``nn.Linear`` of the model (the classifier) with its name.

    ``linear`` for CIFAR ResNets, ``fc`` for torchvision ResNets. Its input is the
    penultimate feature vector ``x`` and its output the logits ``z = W x + b``.
    """
    from torch import nn

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"model {type(model).__name__} has no nn.Linear layer")
    return NamedLayer(*found[-1])


def forward_with_features(model: nn.Module, x: torch.Tensor) -> FeaturesAndLogits:
    """Run the model once; return the last linear layer's input and the model's output.

    Works for every model (a forward hook on :func:`last_linear`), keeps the autograd graph
    unless called under ``torch.no_grad()`` / ``torch.inference_mode()``, and leaves the
    model's train/eval mode as it is.

    Parameters
    ----------
    model : torch.nn.Module
    x : torch.Tensor of shape (B, 3, H, W)
        Preprocessed images.

    Returns
    -------
    FeaturesAndLogits
        ``features`` of shape (B, d) and ``logits`` of shape (B, K).
    """
    _, layer = last_linear(model)
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0])

    handle = layer.register_forward_pre_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"the last linear layer of {type(model).__name__} was not called")
    return FeaturesAndLogits(captured[-1].flatten(1), logits)


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the penultimate features (input of the last linear layer), shape (B, d)."""
    return forward_with_features(model, x).features


def quantizable_layers(
    model: nn.Module, *, input_shape: tuple[int, ...] = (1, 3, 32, 32)
) -> list[LayerInfo]:
    """Return the convolutions and linear layers in the order the forward pass runs them.

    The order is found by one forward pass on zeros of ``input_shape`` in eval mode (the
    model's mode is restored). Layers the forward pass never calls are left out;
    batch-norm layers are not quantized and not listed.
    """
    import torch
    from torch import nn

    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            handles.append(
                m.register_forward_pre_hook(lambda mod, inp, name=name: order.append(name))
            )
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.inference_mode():
            model(torch.zeros(input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    seen: list[str] = list(dict.fromkeys(order))
    out = []
    for name in seen:
        m = model.get_submodule(name)
        kind: Literal["conv", "linear"] = "linear" if isinstance(m, nn.Linear) else "conv"
        out.append(LayerInfo(name, kind, tuple(m.weight.shape), m.bias is not None))
    return out


def layer_table(model: nn.Module) -> pd.DataFrame:
    """Return :func:`quantizable_layers` as a DataFrame (name, kind, weight_shape, n_weights)."""
    rows = [
        {"name": li.name, "kind": li.kind, "weight_shape": li.weight_shape,
         "n_weights": li.n_weights(), "has_bias": li.has_bias}
        for li in quantizable_layers(model)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["name", "kind", "weight_shape", "n_weights", "has_bias"])


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (e.g. ``"layer1.0.conv1"``, ``"linear"``)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [li.name for li in quantizable_layers(model)]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(
            f"model {type(model).__name__} has no layer {name!r}; quantizable layers: {shown}"
        ) from None
