"""Run a caller's model on a device in eval mode, and give it back as it was.

torch is imported inside the functions only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["evaluated_on", "model_device", "modes_kept"]


def model_device(model: nn.Module, default: Any = "cpu") -> torch.device:
    """The device of the first parameter or buffer of ``model`` (``default`` if it has none)."""
    import torch

    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device(default)


@contextmanager
def evaluated_on(model: nn.Module, device: Any) -> Iterator[torch.device]:
    """Move ``model`` to ``device`` in eval mode; on exit restore its devices and modes.

    Yields the device the model's tensors are on once moved (put the inputs there).

    On exit every parameter and buffer goes back to the device it was on (one ``.to`` call
    when they all shared one device) and every submodule gets back its own ``training``
    flag, also when the body raised.
    """
    flags = [(m, m.training) for m in model.modules()]
    saved = [
        (mod, kind, name, t.device)
        for mod in model.modules()
        for kind, store in (("p", mod._parameters), ("b", mod._buffers))
        for name, t in store.items()
        if t is not None
    ]
    devices = {d for *_, d in saved}
    try:
        model.to(device)
        model.eval()
        yield model_device(model, device)
    finally:
        if len(devices) == 1:
            model.to(next(iter(devices)))
        elif devices:  # spread over several devices: put each tensor back
            for mod, kind, name, dev in saved:
                if kind == "p":
                    p = mod._parameters[name]
                    if p is not None and p.device != dev:
                        p.data = p.data.to(dev)
                else:
                    b = mod._buffers[name]
                    if b is not None and b.device != dev:
                        mod._buffers[name] = b.to(dev)
        for m, f in flags:
            m.training = f


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Give every submodule of ``model`` back its own ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f
