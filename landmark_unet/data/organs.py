"""Canonical organ names, in the order used for channels, label bits and reports."""

ORGANS: tuple[str, ...] = ("liver", "kidneys", "pancreas", "spleen", "bladder")


def organ_bit(organ: str) -> int:
    """Bit value of ``organ`` in the cache's packed uint8 label volume (liver 1, kidneys 2, pancreas 4, ...)."""
    return 1 << ORGANS.index(organ)
