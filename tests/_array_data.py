"""An in-memory dataset with the minimal protocol of the all-layer stage (tests only)."""

from __future__ import annotations

import hashlib

__all__ = ["ArrayData"]


class ArrayData:
    """``batches``, ``labels``, ``fingerprint``, ``len`` over in-memory tensors."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.labels = y.numpy()
        self.dataset_id = "tiny"
        h = hashlib.sha256(x.numpy().tobytes() + self.labels.tobytes())
        self.fingerprint = h.hexdigest()

    def __len__(self):
        return len(self.labels)

    def batches(self, batch_size):
        for s in range(0, len(self), batch_size):
            yield self.x[s : s + batch_size], self.y[s : s + batch_size]
