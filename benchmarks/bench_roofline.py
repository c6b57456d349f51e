"""How fast the study's 2D training step could be on a GPU: the memory traffic its non-convolution work cannot do
without, and what that leaves of issue 7's GPU target (FLOP utilisation >= 0.4 of the card's dense bf16 peak).

    python -m benchmarks.bench_roofline [--card "NVIDIA H200"] [--conv-ms 5.77] [--batch 10]

The floor counts bytes, not time: every BatchNorm + ReLU of the classic U-Net (64-1024 channels, batch x 2 x
256 x 256, bf16 activations) fused as well as it can be (forward: one pass reading the convolution's output for
the statistics, one reading it again and writing the normalised, rectified map; backward: one pass reading the
incoming gradient and the saved input for the two sums, one reading both again and writing the input's gradient:
8 activation-sized transfers), the pooled maps and the skip connections' second gradient, and the RMSprop update
(fp32 parameter, gradient, square average and momentum read, three of them written back). Convolutions are not
in it: their time is taken as measured (``--conv-ms``; the default is the H200's cuDNN convolutions, forward and
backward, from ``bench_step``'s profile of the compiled step, benchmarks/README.md). The floor at the card's
datasheet memory bandwidth plus the convolutions' time is the fastest step those convolutions allow, and its FLOP
utilisation the most the target can read.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

from benchmarks.common import DATASHEET_DENSE_TFLOPS
from landmark_unet.models.unet2d import UNet2d

# datasheet HBM bandwidth, TB/s, most specific name first (as DATASHEET_DENSE_TFLOPS)
DATASHEET_TBPS = (("H200 NVL", 4.8), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35),
                  ("A100", 2.0))
BF16, FP32 = 2, 4  # bytes


def step_traffic(net: nn.Module, batch: int, in_channels: int, size: int) -> dict[str, float]:
    """Bytes the non-convolution work of one bf16-mixed training step of ``net`` must move at least, by kind
    (``batch norm + ReLU``, ``pooling and skip gradients``, ``optimiser``), for input (batch, in_channels, size,
    size). Shapes come from a forward pass of a copy of ``net`` on the meta device; nothing is computed."""
    norm, pooled = [], []
    meta = copy.deepcopy(net).to("meta").train()
    for m in meta.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda m, i, o: norm.append(o.numel()))
        elif isinstance(m, nn.MaxPool2d):
            m.register_forward_hook(lambda m, i, o: pooled.append(i[0].numel()))
    with torch.no_grad():
        meta(torch.empty(batch, in_channels, size, size, device="meta"))
    skips = sum(pooled) * BF16  # every pooled map is a skip connection's
    params = sum(p.numel() for p in net.parameters())
    return {"batch norm + ReLU": 8 * sum(norm) * BF16,
            # the pooled map written and its gradient read; the skip's second gradient read and added
            "pooling and skip gradients": 2 * skips / 4 + 2 * skips,
            "optimiser": 7 * params * FP32}


def run(card: str = "NVIDIA H200", conv_ms: float = 5.77, batch: int = 10) -> dict:
    net = UNet2d(in_channels=2, out_channels=1, features=64)
    traffic = step_traffic(net, batch, 2, 256)
    tbps = next(b for part, b in DATASHEET_TBPS if part in card)
    tflops = next(t for part, t in DATASHEET_DENSE_TFLOPS if part in card)
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.empty(batch, 2, 256, 256, device="meta")
    with FlopCounterMode(display=False) as counter:
        net.to("meta")(x).sum().backward()
    flops = counter.get_total_flops()
    floor_ms = {kind: b / (tbps * 1e12) * 1e3 for kind, b in traffic.items()}
    step_ms = conv_ms + sum(floor_ms.values())
    out = {"card": card, "batch": batch, "datasheet_tbps": tbps, "datasheet_dense_bf16_tflops": tflops,
           "step_gflop": flops / 1e9, "convolution_ms": conv_ms,
           "traffic_gb": {k: v / 1e9 for k, v in traffic.items()},
           "floor_ms": floor_ms, "fastest_step_ms": step_ms,
           "max_mfu_datasheet": flops / (step_ms * 1e-3) / (tflops * 1e12),
           "step_ms_for_mfu_0_4": flops / (0.4 * tflops * 1e12) * 1e3}
    for kind, ms in floor_ms.items():
        print(f"{kind:28s} {traffic[kind] / 1e9:6.2f} GB  {ms:5.2f} ms at {tbps} TB/s", flush=True)
    print(f"fastest step with {conv_ms} ms of convolutions: {step_ms:.2f} ms, FLOP utilisation "
          f"{out['max_mfu_datasheet']:.3f} of {tflops} TFLOP/s (0.4 needs {out['step_ms_for_mfu_0_4']:.2f} ms)",
          flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="NVIDIA H200")
    ap.add_argument("--conv-ms", type=float, default=5.77, help="the step's convolutions, forward and backward, ms")
    ap.add_argument("--batch", type=int, default=10)
    args = ap.parse_args()
    print(json.dumps(run(args.card, args.conv_ms, args.batch), indent=2))


if __name__ == "__main__":
    main()
