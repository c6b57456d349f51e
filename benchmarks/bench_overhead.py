"""Lightning's own host time per training step: the LightningModule in ``Trainer.fit`` against the hand-written
loop of ``bench_train``, both on a one-layer network (a 1 x 1 convolution), so that what is left is the framework.

    python -m benchmarks.bench_overhead [--steps 400] [--rounds 3] [--subjects 6] [--precision bf16-mixed]

On a GPU this host time is hidden behind the device's work only while it is shorter than the device's step (the
study's 2D U-Net: 13 ms in bf16 on an H200), so it decides whether Lightning keeps up with a plain loop there. The
batches (one slice each, so that there are many steps an epoch) come from the real DataModule with
``data.on_device`` (the loader carries indices; the slices are gathered where the network runs). Arms alternate
for ``rounds`` rounds; reports the median step of each arm and their difference.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from benchmarks.bench_train import lightning_arm, plain_arm, rmsprop
from benchmarks.common import device, device_name, full_size_datamodule, median
from landmark_unet import host_memory
from landmark_unet.config import quiet_third_party
from landmark_unet.lit.segmentation import SegmentationModule


class OneConv(nn.Module):
    """(B, 2, H, W) -> (B, 1, H, W) by one 1 x 1 convolution: next to no device work."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def run(steps: int = 400, rounds: int = 3, subjects: int = 6, precision: str = "bf16-mixed") -> dict:
    quiet_third_party()
    host_memory.reuse_freed_memory(True)  # as the entry points run (reuse_host_memory=true)
    dev = device()
    dm = full_size_datamodule(subjects=subjects, workers=2, on_device=True, batch_size=1)
    dm.prepare_data()
    dm.setup("fit")
    module = SegmentationModule(OneConv(), ["liver"], rmsprop(), channels_last=True)
    times: dict[str, list[float]] = {"lightning": [], "plain": []}
    for r in range(rounds):
        for arm in ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning"):
            if arm == "lightning":
                t = lightning_arm(module, dm, precision, steps)[0]
            else:
                t = plain_arm(module, dm, precision, steps, dev)
            times[arm].append(median(t))
            print(f"round {r} {arm}: {len(t)} steps, median {median(t) * 1e3:.3f} ms", flush=True)
    lightning, plain = median(times["lightning"]), median(times["plain"])
    return {"device": device_name(), "precision": precision, "steps_per_epoch": len(t),
            "step_ms_lightning": lightning * 1e3, "step_ms_plain": plain * 1e3,
            "lightning_host_overhead_ms": (lightning - plain) * 1e3,
            "arm_medians_ms": {k: [x * 1e3 for x in v] for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--precision", default="bf16-mixed")
    args = ap.parse_args()
    print(json.dumps(run(args.steps, args.rounds, args.subjects, args.precision), indent=2))


if __name__ == "__main__":
    main()
