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
- :func:`quantizable_layers`: every convolution, linear layer and attention projection in
  the order the forward pass runs them, for any network (norm layers are not quantized;
  ``theory/multilayer.md``, section 12);
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
    "SUPPORTED_LAYER_TYPES",
    "AttentionProjection",
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

    The weight is ``get_layer(model, name).weight``: (out, in, k...) for a convolution,
    (out, in) for a linear layer or an attention projection (the packed in-projection of
    ``nn.MultiheadAttention`` is (3E, E), named ``<attention>.in_proj``).

    Attributes
    ----------
    tied : tuple of str
        Other layers (module names) that use the same weight tensor; the layer stands for
        all of them and its Jacobian is the total one, through every use.
    parameter : str
        Dotted name of the weight in ``model.named_parameters()`` (for ``functional_call``).
    """

    name: str
    kind: Literal["conv", "linear"]
    weight_shape: tuple[int, ...]
    has_bias: bool
    tied: tuple[str, ...] = ()
    parameter: str = ""

    def n_weights(self) -> int:
        """Number of weight entries."""
        n = 1
        for s in self.weight_shape:
            n *= s
        return n


class AttentionProjection(NamedTuple):
    """An input projection of ``nn.MultiheadAttention``, a layer that is not a module.

    ``weight`` is the live parameter (``in_proj_weight`` of shape (3E, E), or
    ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when the key and value
    dimensions differ from E), ``bias`` its part of ``in_proj_bias`` (None when absent) and
    ``attention`` the module.
    """

    weight: Any  # nn.Parameter
    bias: Any  # torch.Tensor or None
    attention: Any  # nn.MultiheadAttention


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


#: The layer types whose per-sample weight gradients :mod:`~distortion.experiments.sensitivity`
#: computes (``nn.MultiheadAttention`` stands for its input and output projections).
SUPPORTED_LAYER_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear", "MultiheadAttention")

#: Attention input projections: layer-name suffix -> parameter of nn.MultiheadAttention.
_ATTENTION_INPUTS = {
    "in_proj": "in_proj_weight",
    "q_proj": "q_proj_weight",
    "k_proj": "k_proj_weight",
    "v_proj": "v_proj_weight",
}


@dataclass(frozen=True)
class _LayerSpec:
    """How the forward pass uses one quantizable weight (internal to discovery)."""

    name: str  # the layer: a module, or "<attention>.in_proj" / "<attention>.out_proj"
    kind: Literal["conv", "linear"]
    role: Literal["module", "in_proj", "q_proj", "k_proj", "v_proj", "out_proj"]
    parameter: str  # dotted parameter name of the weight
    hooked: tuple[str, ...]  # modules whose own calls use the weight (tied ones included)
    batch_dims: tuple[int, ...]  # per hooked module: the batch dimension of its input
    # (attention projections are found by their weight inside the attention call)
    tied: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Discovery:
    """Result of :func:`_discover`: the supported layers in forward order, the others."""

    layers: tuple[_LayerSpec, ...]
    unsupported: dict[str, str]  # layer name -> why (names its type)
    aliases: dict[str, str]  # a tied layer's other names -> the name that stands for it

    def spec(self, name: str) -> _LayerSpec:
        return {s.name: s for s in self.layers}[self.aliases.get(name, name)]


def _is_norm(m: nn.Module) -> bool:
    from torch import nn

    norms: tuple[type, ...] = (
        nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    )  # fmt: skip
    if hasattr(nn, "RMSNorm"):
        norms += (nn.RMSNorm,)
    return isinstance(m, norms)


def _own_weights(m: nn.Module) -> list[str]:
    """Names of the module's own weight-like parameters (``weight``, ``*_weight``, ``weight_*``)."""
    return [
        k for k, v in m._parameters.items()
        if v is not None and (k == "weight" or k.endswith("_weight") or k.startswith("weight_"))
    ]  # fmt: skip


class _NoFastPath:
    """A no-op ``TorchFunctionMode``: while active, the transformer fast paths (which skip
    the sub-module calls) are off, since they require no ``__torch_function__`` override."""

    def __new__(cls):
        from torch.overrides import TorchFunctionMode

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        return _Mode()


def _first_input(args: tuple, kwargs: dict) -> Any:
    """A module call's input tensor: the first positional one, else ``input`` / ``query``."""
    import torch

    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    a = kwargs.get("input", kwargs.get("query"))
    return a if isinstance(a, torch.Tensor) else None


def _batch_dim(s2: tuple[int, ...], s3: tuple[int, ...]) -> int | str:
    """The batch dimension from an input's shapes at batch sizes 2 and 3, or why not."""
    if len(s2) != len(s3):
        return f"its input has {len(s2)} dimensions at batch size 2 and {len(s3)} at 3"
    diff = [d for d, (a, b) in enumerate(zip(s2, s3, strict=True)) if a != b]
    if not diff:
        return "its input does not carry the batch dimension"
    if len(diff) > 1 or s2[diff[0]] != 2 or s3[diff[0]] != 3:
        return (
            f"its input merges the batch with another dimension (shape {s2} at batch size 2, "
            f"{s3} at 3)"
        )
    return diff[0]


def _discover(model: nn.Module, example: torch.Tensor) -> _Discovery:
    """Find the quantizable layers the forward pass uses, in call order.

    Two forward passes (batch sizes 2 and 3, copies of ``example[:1]``, eval mode, no
    gradient, transformer fast paths off) record every call of a module that owns a weight;
    comparing the input shapes of the two passes gives each layer's batch dimension.
    Norm layers are not quantized. Weights reachable from several modules (tied) form one
    layer, named after its first call.
    """
    import torch
    from torch import nn

    aliases_of: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        aliases_of.setdefault(id(m), []).append(n)
    out_projs = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    supported = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    watched: dict[str, nn.Module] = {}
    for n, m in model.named_modules():
        if id(m) in out_projs or _is_norm(m):
            continue
        if isinstance(m, (nn.MultiheadAttention, *supported)) or _own_weights(m):
            watched[n] = m
    calls: dict[int, list[tuple[str, tuple[int, ...] | None]]] = {2: [], 3: []}
    current: list[list] = []

    def pre_hook(name):
        def hook(mod, args, kwargs):
            a = _first_input(args, kwargs)
            current[0].append((name, None if a is None else tuple(a.shape)))

        return hook

    handles = [
        m.register_forward_pre_hook(pre_hook(n), with_kwargs=True) for n, m in watched.items()
    ]
    p = next(iter(model.parameters()), None)
    x1 = example[:1]
    if p is not None and x1.is_floating_point():
        x1 = x1.to(p.dtype)
    try:
        with torch.no_grad(), _NoFastPath():
            for b in (2, 3):
                current[:] = [calls[b]]
                model(x1.repeat(b, *([1] * (x1.ndim - 1))))
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(n for n, _ in calls[2]))
    if not order:
        raise ValueError(
            f"model {type(model).__name__} calls no layer with a weight (supported types: "
            f"{', '.join(SUPPORTED_LAYER_TYPES)})"
        )
    shapes2: dict[str, list] = {}
    shapes3: dict[str, list] = {}
    for n, s in calls[2]:
        shapes2.setdefault(n, []).append(s)
    for n, s in calls[3]:
        shapes3.setdefault(n, []).append(s)

    # every use of a weight: (layer name, role, parameter object, module name, batch dim)
    uses: list[tuple[str, str, Any, str, int | str, str]] = []
    unsupported: dict[str, str] = {}
    for n in order:
        m = watched[n]
        prefix = f"{n}." if n else ""
        if isinstance(m, nn.MultiheadAttention):
            q2 = shapes2[n]
            bad = next((s for s in q2 if s is None or len(s) != 3), "ok")
            why = "ok" if bad == "ok" else "it is called on an unbatched (2-D) input"
            inputs = ["in_proj"] if m._qkv_same_embed_dim else ["q_proj", "k_proj", "v_proj"]
            for role in [*inputs, "out_proj"]:
                pname = "out_proj.weight" if role == "out_proj" else _ATTENTION_INPUTS[role]
                w = m.out_proj.weight if role == "out_proj" else getattr(m, pname)
                uses.append((prefix + role, role, w, n, 1 if why == "ok" else why, prefix + pname))
            continue
        if not isinstance(m, supported):
            unsupported[n] = f"it is a {type(m).__name__}"
            for k in _own_weights(m):
                uses.append((n, "unsupported", m._parameters[k], n, "-", prefix + k))
            continue
        s2, s3 = shapes2.get(n, []), shapes3.get(n, [])
        dims: set[int | str] = set()
        if len(s2) != len(s3) or any(a is None for a in s2 + s3):
            dims.add("it is called a different number of times at batch sizes 2 and 3")
        else:
            dims.update(_batch_dim(a, b) for a, b in zip(s2, s3, strict=True))
        is_conv = isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        if len(dims) == 1 and is_conv and dims != {0}:
            dims = {"its input is not batched along its first dimension"}
        bd = dims.pop() if len(dims) == 1 else "its calls have different batch dimensions"
        uses.append((n, "module", m.weight, n, bd, prefix + "weight"))

    # group the uses by weight tensor (tied weights, aliased modules)
    groups: dict[int, list[int]] = {}
    for i, u in enumerate(uses):
        groups.setdefault(id(u[2]), []).append(i)
    layers: list[_LayerSpec] = []
    aliases: dict[str, str] = {}
    for idx in groups.values():
        first = uses[idx[0]]
        name, role = first[0], first[1]
        names = list(dict.fromkeys(uses[i][0] for i in idx))
        for i in idx:  # the same module under other names
            mod_name, r = uses[i][3], uses[i][1]
            for a in aliases_of.get(id(watched[mod_name]), []):
                if a != mod_name:
                    names.append(a if r in ("module", "unsupported") else f"{a}.{r}".lstrip("."))
        names = list(dict.fromkeys(names))
        tied = tuple(a for a in names if a != name)
        bad = [
            f"{uses[i][0]!r} ({unsupported.get(uses[i][0]) or uses[i][4]})"
            for i in idx
            if uses[i][1] == "unsupported" or isinstance(uses[i][4], str)
        ]
        if bad:
            if len(idx) > 1:
                for a in names:
                    unsupported[a] = f"its weight is shared with {', '.join(bad)}"
            elif name not in unsupported:
                unsupported[name] = str(first[4])
            continue
        for a in tied:
            aliases[a] = name
        module = watched[first[3]] if role == "module" else None
        kind: Literal["conv", "linear"] = (
            "conv" if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) else "linear"
        )
        layers.append(
            _LayerSpec(
                name=name, kind=kind, role=role, parameter=first[5],
                hooked=tuple(uses[i][3] for i in idx if uses[i][1] == "module"),
                batch_dims=tuple(uses[i][4] for i in idx if uses[i][1] == "module"),
                tied=tied,
            )  # fmt: skip
        )
    return _Discovery(tuple(layers), unsupported, aliases)


def _example(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    p = next(model.parameters())
    return torch.zeros(input_shape, dtype=p.dtype, device=p.device)


def quantizable_layers(
    model: nn.Module, *, input_shape: tuple[int, ...] = (1, 3, 32, 32)
) -> list[LayerInfo]:
    """Return the quantizable layers in the order the forward pass runs them.

    Convolutions (``nn.Conv1d/2d/3d``, grouped and depthwise included), linear layers and the
    projections of ``nn.MultiheadAttention`` (the packed input projection as
    ``<attention>.in_proj``, the output projection as ``<attention>.out_proj``; the linear
    layers of ``nn.TransformerEncoderLayer`` are plain ``nn.Linear``). The order is found by
    forward passes on zeros shaped like ``input_shape`` (its batch size replaced by 2 and 3)
    in eval mode (the model's mode is restored). Layers the forward pass never calls are
    left out; norm layers are not quantized and not listed, nor are layers of an
    unsupported type (see :data:`SUPPORTED_LAYER_TYPES`). A weight tensor shared by several
    modules is listed once, under its first use, with the others in ``tied``.
    """
    found = _discover_kept_modes(model, input_shape)
    out = []
    for s in found.layers:
        layer = get_layer(model, s.name)
        out.append(
            LayerInfo(
                s.name, s.kind, tuple(layer.weight.shape), layer.bias is not None,
                s.tied, s.parameter,
            )  # fmt: skip
        )
    return out


def _discover_kept_modes(model: nn.Module, input_shape: tuple[int, ...]) -> _Discovery:
    was = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        return _discover(model, _example(model, input_shape))
    finally:
        for m, f in was:
            m.training = f


def layer_table(model: nn.Module) -> pd.DataFrame:
    """Return :func:`quantizable_layers` as a DataFrame (name, kind, weight_shape, n_weights)."""
    rows = [
        {"name": li.name, "kind": li.kind, "weight_shape": li.weight_shape,
         "n_weights": li.n_weights(), "has_bias": li.has_bias}
        for li in quantizable_layers(model)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["name", "kind", "weight_shape", "n_weights", "has_bias"])


def get_layer(model: nn.Module, name: str) -> Any:
    """Return the layer called ``name`` (e.g. ``"layer1.0.conv1"``, ``"linear"``).

    A sub-module (``model.get_submodule``), or for ``"<attention>.in_proj"`` (and
    ``q_proj`` / ``k_proj`` / ``v_proj``) of an ``nn.MultiheadAttention`` an
    :class:`AttentionProjection`; either way ``.weight`` is the layer's weight parameter
    and ``.bias`` its bias (or None).
    """
    from torch import nn

    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    parent, _, leaf = name.rpartition(".")
    if leaf in _ATTENTION_INPUTS:
        try:
            m = model.get_submodule(parent)
        except AttributeError:
            m = None
        is_attention = isinstance(m, nn.MultiheadAttention)
        w = getattr(m, _ATTENTION_INPUTS[leaf], None) if is_attention else None
        if w is not None:
            bias = m.in_proj_bias
            if bias is not None and leaf != "in_proj":
                bias = bias.chunk(3)[list(_ATTENTION_INPUTS).index(leaf) - 1]
            return AttentionProjection(w, bias, m)
    try:
        names = [li.name for li in quantizable_layers(model)]
    except Exception:  # the default input shape may not fit the model
        names = [n for n, m in model.named_modules() if _own_weights(m)]
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise ValueError(
        f"model {type(model).__name__} has no layer {name!r}; quantizable layers: {shown}"
    ) from None
