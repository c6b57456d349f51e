"""``reuse_host_memory``: freed memory stays in the process and the next allocation reuses its pages."""

from __future__ import annotations

import os
import resource

import pytest
import torch

from landmark_unet import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="the C library is not glibc")

MIB = 2**20
SIZE = 256 * MIB  # above glibc's largest mmap threshold (32 MiB): by default such a block is mmapped


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def touched_block(size: int = SIZE) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8).fill_(1)


def freed_and_refaulted() -> tuple[int, int]:
    """Bytes given back to the system when a touched 256 MiB tensor is freed, and the page faults of allocating
    and touching a slightly smaller one (it fits the freed block wherever objects allocated meanwhile lie)."""
    block = touched_block()
    before = resident_bytes()
    del block
    released = before - resident_bytes()
    faults = page_faults()
    block = touched_block(SIZE - MIB)
    faults = page_faults() - faults
    del block
    return released, faults


@pytest.fixture
def restore_setting():
    yield
    host_memory.reuse_freed_memory(True)  # what every entry point sets by default


def test_freed_memory_is_kept_and_reused_only_when_asked(restore_setting):
    assert host_memory.reuse_freed_memory(False)
    released, _ = freed_and_refaulted()
    assert released > 0.8 * SIZE  # glibc's default: the block goes back to the system at once

    assert host_memory.reuse_freed_memory(True)
    freed_and_refaulted()  # grows the heap to hold the block
    released, faults = freed_and_refaulted()
    assert released < 0.1 * SIZE
    assert faults < 0.02 * SIZE / os.sysconf("SC_PAGE_SIZE")  # the pages were still mapped


def test_the_setting_must_be_a_bool():
    with pytest.raises(host_memory.InputError, match="reuse_host_memory: expected true or false, got 'yes'"):
        host_memory.apply_config({"reuse_host_memory": "yes"})
    assert host_memory.apply_config({}) is True  # default: on
