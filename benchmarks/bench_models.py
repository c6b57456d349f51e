"""One training step of each network at the study's configuration on this machine, fp32 and bf16-mixed.

    python -m benchmarks.bench_models [--steps 2] [--models unet2d,unet2d_multitask,unet3d,unet3d_full] [--channels-last-only]

- unet2d: classic U-Net 64-1024, batch 10 x 2 x 256 x 256 (fat + water), one organ, RMSprop (the study's 2D);
- unet2d_multitask: batch 10 x 1 x 256 x 256 (fat only, Table 1), five heads, RMSprop;
- unet3d: batch 4 x 2 x 5 x 256 x 256, Adam (the study's depth-5);
- unet3d_full: batch 2 x 2 x 64 x 160 x 160 patches, six outputs (background + five organs), SGD (the strong
  recipe's volumetric network, ``model=unet3d_full``).
Each in channels-last memory format (the configs' default) and, for the record of what that did, contiguous. The
step is forward + summed BCE + backward + optimizer step, on the CPU (or the GPU when present), in the
LightningModule's own loss; bf16-mixed is torch.autocast(bfloat16) around forward and loss, as Lightning does.
Reports the fastest of ``steps`` timed steps after one warm-up, and the bf16/fp32 speed-up measured side by side.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from landmark_unet import host_memory
from landmark_unet.lit.segmentation import SegmentationModule
from landmark_unet.models.multitask import UNet2dMultiTask
from landmark_unet.models.unet2d import UNet2d
from landmark_unet.models.unet3d import UNet3d
from landmark_unet.models.unet3d_full import UNet3dFull

FULL_POOLING = [(1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]  # conf/model/unet3d_full.yaml
CONFIGS = {
    "unet2d": (lambda: UNet2d(2, 1), (10, 2, 256, 256), 1, torch.optim.RMSprop),
    "unet2d_multitask": (lambda: UNet2dMultiTask(1, 5), (10, 1, 256, 256), 5, torch.optim.RMSprop),
    "unet3d": (lambda: UNet3d(2, 1), (4, 2, 5, 256, 256), 1, torch.optim.Adam),
    "unet3d_full": (lambda: UNet3dFull(2, 6, pool_kernels=FULL_POOLING), (2, 2, 64, 160, 160), 6, torch.optim.SGD),
}


def step_seconds(name: str, precision: str, steps: int, device: str, channels_last: bool = True) -> float:
    build, shape, k, opt_cls = CONFIGS[name]
    torch.manual_seed(0)
    module = SegmentationModule(build(), ["o"] * k, opt_cls, channels_last=channels_last).to(device)
    opt = opt_cls(module.parameters(), lr=1e-5)
    x = torch.randn(shape, device=device)
    spatial = shape[2:] if getattr(module.net, "stack_depth", 1) == 0 else shape[-2:]  # a patch network keeps depth
    y = (torch.rand(shape[0], k, *spatial, device=device) > 0.5).float()
    times = []
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = module.loss(module(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


def peak_memory_gib(device: str) -> float:
    """Peak memory so far: on a GPU the most allocated since the last reset; on a CPU the process's peak resident
    set (``ru_maxrss``, never reset: of the largest model so far)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(steps: int = 2, models: tuple[str, ...] = tuple(CONFIGS), layouts: tuple[bool, ...] = (True, False)) -> dict:
    """Per model: step seconds in fp32 and bf16-mixed, channels-last (the configs' default) and, for the record of
    what channels-last did, contiguous, one after the other in this process; and the peak memory after its steps
    (:func:`peak_memory_gib`)."""
    host_memory.reuse_freed_memory(True)  # as the entry points run (reuse_host_memory=true)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                 "threads": torch.get_num_threads()}
    for name in models:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for channels_last in layouts:
            suffix = "" if channels_last else "_contiguous"
            for precision, tag in (("32-true", "fp32"), ("bf16-mixed", "bf16")):
                out[f"step_seconds_{name}_{tag}{suffix}"] = step_seconds(name, precision, steps, device, channels_last)
            out[f"bf16_speedup_{name}{suffix}"] = out[f"step_seconds_{name}_fp32{suffix}"] / out[
                f"step_seconds_{name}_bf16{suffix}"]
        out[f"peak_memory_gib_{name}"] = peak_memory_gib(device)
        if len(layouts) == 2:
            for tag in ("fp32", "bf16"):
                out[f"channels_last_speedup_{name}_{tag}"] = (out[f"step_seconds_{name}_{tag}_contiguous"]
                                                              / out[f"step_seconds_{name}_{tag}"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--models", default=",".join(CONFIGS))
    ap.add_argument("--channels-last-only", action="store_true", help="skip the contiguous-layout comparison")
    args = ap.parse_args()
    layouts = (True,) if args.channels_last_only else (True, False)
    print(json.dumps(run(args.steps, tuple(args.models.split(",")), layouts), indent=2))


if __name__ == "__main__":
    main()
