"""Canonical organ names, in the order used for channels, label bits and reports."""

import numpy as np

ORGANS: tuple[str, ...] = ("liver", "kidneys", "pancreas", "spleen", "bladder")


def organ_bit(organ: str) -> int:
    """Bit value of ``organ`` in the cache's packed uint8 label volume (liver 1, kidneys 2, pancreas 4, ...)."""
    return 1 << ORGANS.index(organ)


def unpack_labels(labels, bits, axis: int = 0):
    """Boolean masks, one per organ bit of ``bits`` (K,), of a packed uint8 label array (the cache's labels, any
    shape); the organ axis is inserted at ``axis``: (Z, X, Y) -> (K, Z, X, Y) for ``axis=0``. A torch tensor of
    labels gives a torch mask on its device (``bits`` best already there: no copy per call)."""
    if hasattr(labels, "unsqueeze"):  # a torch tensor (torch itself stays unimported: configs use this module)
        bits = bits.to(labels.device, labels.dtype) if hasattr(bits, "to") else labels.new_tensor(
            np.asarray(bits, dtype=np.uint8))
        labels = labels.unsqueeze(axis)
    else:
        bits = np.asarray(bits, dtype=np.uint8)
        labels = np.expand_dims(np.asarray(labels), axis)
    shape = [1] * labels.ndim
    shape[axis] = len(bits)
    return (labels & bits.reshape(shape)) > 0
