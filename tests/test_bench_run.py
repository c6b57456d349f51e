"""What a run (metrics.json) and the benchmarks (results.json) record about the machine."""

from pathlib import Path

import pytest

from benchmarks.run import machine as bench_machine
from landmark_unet.runinfo import CPU_FLAGS, machine


def test_machine_names_the_cpu_and_its_extensions():
    info = machine()
    assert set(info["cpu_flags"]) <= set(CPU_FLAGS) and info["cores"] >= 1
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    assert info["cpu_flags"] == [f for f in CPU_FLAGS if f in flags]


def test_benchmark_results_also_record_package_versions():
    info = bench_machine()
    assert info["versions"]["torch"] == info["torch"]  # the installed distribution is the imported one
    assert {"numpy", "scipy", "pytorch_lightning"} <= set(info["versions"])
    assert {"cpu", "cpu_flags", "cores"} <= set(info)
