"""How the process's C allocator hands memory back to the operating system.

A training step of the study's 2D U-Net on a CPU allocates and frees gigabytes of activations and gradients, in
tensors of 5-170 MB. glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns them with ``munmap`` when freed, so every step faults in (and the kernel zeroes) all of that
memory again: on this project's 2-core CPU 1.9 million page faults and 4-6 s of system time in a 12-15 s fp32 step
(``benchmarks/bench_step.py --variants eager,eager_release_memory``). :func:`reuse_freed_memory` tells glibc to
serve every block from its heap and keep freed memory there, so the next step reuses pages already mapped: the
effect PyTorch's CPU tuning guide gets by preloading jemalloc or tcmalloc, without a preload. The cost is that the
process keeps its high-water mark of memory until it exits (its peak resident memory grows a little, by
fragmentation of the one heap).

On a GPU the large tensors live in CUDA's caching allocator, so this changes little there; on a C library other
than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import platform

from landmark_unet.errors import InputError

# mallopt(3) parameters and glibc's defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def reuse_freed_memory(enabled: bool = True) -> bool:
    """Keep freed memory in the process for reuse (``enabled``), or give large blocks back to the system again
    (glibc's default limits; its dynamic mmap threshold is not restored).

    ``enabled``: ``mallopt(M_MMAP_MAX, 0)`` (no block is mmapped) and ``mallopt(M_TRIM_THRESHOLD, -1)`` (the
    heap is never trimmed). Applies to the whole process and to the processes it forks afterwards (data loader
    workers). Returns whether the setting was applied (False where the C library is not glibc).
    """
    libc = _glibc()
    if libc is None:
        return False
    mmap_max, trim = (0, _NEVER_TRIM) if enabled else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    applied = libc.mallopt(_M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1
    if not enabled:
        release_free_memory()
    return applied


def release_free_memory() -> None:
    """Give the heap's free pages back to the system now (``malloc_trim(0)``), whatever the setting.

    A process that forks (data loader workers) after its heap has grown shares those pages with the child, and
    then copies each one it writes to: the first steps after a fork pay for the whole heap once. Benchmarks call
    this between arms, so that each arm forks its workers as a fresh training run does."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def apply_config(cfg, key: str = "reuse_host_memory") -> bool:
    """Apply the entry point's ``reuse_host_memory`` setting (default true; :func:`reuse_freed_memory`).

    Raises:
        InputError: the value is not true or false (names the key).
    """
    value = cfg.get(key, True)
    if not isinstance(value, bool):
        raise InputError(key, f"expected true or false, got {value!r}")
    return reuse_freed_memory(value)
