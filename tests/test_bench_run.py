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


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H200", "bf16-mixed", 989.5), ("NVIDIA H200 NVL", "bf16-mixed", 835.5),
    ("NVIDIA H100 80GB HBM3", "16-mixed", 989.5), ("NVIDIA H100 PCIe", "bf16-mixed", 756.5),
    ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312.0),
    ("NVIDIA H200", "32-true", None), ("cpu", "bf16-mixed", None), ("NVIDIA GeForce GTX 1080", "16-mixed", None),
])
def test_datasheet_peak_names_the_card_and_only_tensor_core_precisions(name, precision, tflops):
    """The second MFU yardstick: the card's datasheet dense peak, the most specific name first (an H200 NVL is
    not taken for an H200); nothing for fp32, a CPU or an unlisted card."""
    from benchmarks.common import datasheet_peak

    peak = datasheet_peak(name, precision)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_roofline_counts_every_norm_and_skip_of_the_unet():
    """bench_roofline's byte floor against a count by hand: a U-Net of depth 2 and width 4 on 2 x 1 x 32 x 32 has
    two BatchNorms per block at (4, 32^2), (8, 16^2), (16, 8^2), (8, 16^2), (4, 32^2), and skips at the first two
    levels; 8 bf16 transfers per normalised element, 2.5 per skip element, 7 fp32 ones per parameter."""
    from benchmarks.bench_roofline import step_traffic
    from landmark_unet.models.unet2d import UNet2d

    net = UNet2d(in_channels=1, out_channels=1, features=4, depth=2)
    params = sum(p.numel() for p in net.parameters())
    traffic = step_traffic(net, batch=2, in_channels=1, size=32)
    normalised = 2 * 2 * (4 * 32**2 + 8 * 16**2 + 16 * 8**2 + 8 * 16**2 + 4 * 32**2)
    skips = 2 * (4 * 32**2 + 8 * 16**2)
    assert traffic == {"batch norm + ReLU": 8 * 2 * normalised, "pooling and skip gradients": 2.5 * 2 * skips,
                       "optimiser": 7 * 4 * params}
