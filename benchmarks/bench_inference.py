"""Whole-body inference of one 256 x 256 x 252 volume: landmark_unet's ``predict_volume`` against MONAI's
``sliding_window_inference`` running the same network on the same volume, for the 2D U-Net and the depth-5 network.

    python -m benchmarks.bench_inference [--slices 252] [--repeats 2] [--precision bf16-mixed] [--batch 16]

- 2D: MONAI slides a (256, 256, 1) window over the (1, C, X, Y, Z) volume, ``sw_batch_size`` windows per pass; the
  predictor drops the unit axis for the network and puts it back.
- Depth-5: MONAI slides a (5, 256, 256) window with stride 1 over the volume padded by its edge slices (as
  landmark_unet's stacks are), weighting each window's output by 1 on its middle slice and 0 elsewhere, which
  reproduces the depth-5 network's inference exactly (the maximum difference is reported).
Both arms take their natural input (ours the cache's (Z, C, X, Y) array, MONAI's a channel-first tensor), run the
network in eval mode under the same autocast and return sigmoid probabilities on the host. Ours runs twice: with
BatchNorm folded into the convolutions (once per model; the fold's own time is ``fold_seconds_*``) and unfolded, the
very same computation as MONAI's; ``seconds_per_volume_*`` and the ratio are those of the variant that
``inference.inference_network`` picks on this device (folded on the CPU, unfolded on a GPU). A fourth arm runs the
network compiled for inference (``predict.compile=true``: on the CPU folded and compiled with Inductor's freezing; on
a GPU with CUDA graphs), compiled in its warm-up call (``first_call_seconds_*``); its figures carry ``_compiled``. Every arm runs with freed
memory kept for reuse, as predict and evaluate do (``reuse_host_memory=true``, :mod:`landmark_unet.host_memory`);
a fifth arm, ``_folded_release_memory``, runs the folded network with glibc's default instead.
The arms alternate (A B C D E, then E D C B A) for ``repeats`` rounds; ratio = MONAI's median
seconds / ours (>= 1: ours is at least as fast). Outputs are compared on the first slices.
FLOP utilisation: forward FLOPs counted by ``torch.utils.flop_counter`` over our time, over the peak of a large
matmul in the same precision measured in this run.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import PEAK_DTYPE, device, device_name, matmul_peak, median, sync
from landmark_unet import host_memory
from landmark_unet.inference import autocast, fold_batchnorm, inference_network, predict_volume
from landmark_unet.lit.segmentation import SegmentationModule
from landmark_unet.models.unet2d import UNet2d
from landmark_unet.models.unet3d import UNet3d


def network(stack: int, dev: torch.device) -> SegmentationModule:
    """The study's network (2D U-Net or depth-5), 2 channels in, one organ out, as training builds it."""
    torch.manual_seed(0)
    net = UNet3d(2, 1) if stack > 1 else UNet2d(2, 1)
    return SegmentationModule(net, ["liver"], torch.optim.Adam, channels_last=True).to(dev).eval()


def ours(model, image: np.ndarray, stack: int, batch: int, dev: torch.device, precision: str) -> np.ndarray:
    """(K, X, Y, Z) probabilities from the cache's (Z, C, X, Y) array; ``model`` folded or not by the caller, once
    for all volumes, as ``predict`` and ``evaluate`` do."""
    return predict_volume(model, image, stack=stack, batch_size=batch, device=dev, precision=precision)


@torch.no_grad()
def monai(model, volume: torch.Tensor, stack: int, batch: int, dev: torch.device, precision: str) -> np.ndarray:
    """(K, X, Y, Z) probabilities through MONAI's sliding_window_inference; ``volume`` (1, C, X, Y, Z) on the host."""
    from monai.inferers import sliding_window_inference

    _, _, x, y, z = volume.shape
    volume = volume.to(dev)
    with autocast(dev, precision):
        if stack == 1:
            out = sliding_window_inference(volume, (x, y, 1), batch, lambda w: model(w[..., 0])[..., None],
                                           overlap=0.0, mode="constant")
            prob = torch.sigmoid(out[0].float())  # (K, X, Y, Z)
        else:
            half = stack // 2
            zxy = volume.permute(0, 1, 4, 2, 3)  # (1, C, Z, X, Y): depth first, as the network takes its stacks
            padded = torch.cat([zxy[:, :, :1].expand(-1, -1, half, -1, -1), zxy,
                                zxy[:, :, -1:].expand(-1, -1, half, -1, -1)], dim=2)
            weight = torch.zeros(1, 1, stack, x, y, device=dev)
            weight[:, :, half] = 1

            def middle(w: torch.Tensor) -> torch.Tensor:  # (B, C, 5, X, Y) -> (B, K, 5, X, Y), the middle filled
                logits = model(w)
                out = logits.new_zeros(logits.shape[0], logits.shape[1], stack, x, y)
                out[:, :, half] = logits
                return out

            out = sliding_window_inference(padded, (stack, x, y), batch, middle, overlap=(1 - 1 / stack, 0, 0),
                                           mode="constant", roi_weight_map=weight)
            prob = torch.sigmoid(out[0, :, half:half + z].float()).permute(0, 2, 3, 1)  # (K, X, Y, Z)
    return prob.cpu().numpy()


def forward_flops(model, stack: int, dev: torch.device, slices: int) -> int:
    """Forward FLOPs of the network over ``slices`` samples (counted for one, times ``slices``)."""
    shape = (1, 2, stack, 256, 256) if stack > 1 else (1, 2, 256, 256)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(shape, device=dev))
    return counter.get_total_flops() * slices


def released(f):
    """``f`` run with glibc's default of giving large freed blocks back to the system (``reuse_host_memory=false``);
    every other arm runs as the entry points do, with freed memory kept for reuse."""
    host_memory.reuse_freed_memory(False)
    try:
        return f()
    finally:
        host_memory.reuse_freed_memory(True)


def run(slices: int = 252, repeats: int = 2, precision: str = "bf16-mixed", batch: int = 16) -> dict:
    host_memory.reuse_freed_memory(True)  # as predict and evaluate run (reuse_host_memory=true)
    dev = device()
    peak = matmul_peak(PEAK_DTYPE[precision], dev)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((slices, 2, 256, 256), dtype=np.float32)  # (Z, C, X, Y), the cache's layout
    volume = torch.from_numpy(image).permute(1, 2, 3, 0)[None].contiguous()  # (1, C, X, Y, Z), MONAI's
    out: dict = {"device": device_name(), "threads": torch.get_num_threads(), "precision": precision,
                 "volume": [256, 256, slices], "batch": batch, "repeats": repeats}
    for name, stack in (("2d", 1), ("depth5", 5)):
        model = network(stack, dev)
        sync(dev)
        t0 = time.perf_counter()
        folded = fold_batchnorm(model)  # once per model, as predict and evaluate do
        sync(dev)
        out[f"fold_seconds_{name}"] = time.perf_counter() - t0
        mine = "ours_folded" if inference_network(model, dev) is not model else "ours_unfolded"
        compiled = inference_network(model, dev, compile=True)  # predict.compile=true: compiles at its first batch

        def arms(z: int, model=model, folded=folded, compiled=compiled, stack=stack) -> dict:
            """The five arms over the first z slices."""
            return {"ours_folded": lambda: ours(folded, image[:z], stack, batch, dev, precision),
                    "monai": lambda: monai(model, volume[..., :z], stack, batch, dev, precision),
                    "ours_unfolded": lambda: ours(model, image[:z], stack, batch, dev, precision),
                    "ours_compiled": lambda: ours(compiled, image[:z], stack, batch, dev, precision),
                    "ours_folded_release_memory": lambda: released(
                        lambda: ours(folded, image[:z], stack, batch, dev, precision))}

        first = {}
        for arm, f in arms(min(slices, 2 * batch)).items():  # warm-up (compilation), and outputs to compare
            t0 = time.perf_counter()
            first[arm] = f()
            out[f"first_call_seconds_{name}_{arm}"] = time.perf_counter() - t0
        out[f"max_abs_diff_{name}"] = float(np.abs(first["ours_unfolded"] - first["monai"]).max())
        out[f"max_abs_diff_{name}_folded"] = float(np.abs(first["ours_folded"] - first["monai"]).max())
        out[f"max_abs_diff_{name}_compiled"] = float(np.abs(first["ours_compiled"] - first["monai"]).max())
        times: dict[str, list[float]] = {k: [] for k in first}
        for r in range(repeats):
            for arm in (list(times) if r % 2 == 0 else list(times)[::-1]):
                sync(dev)
                t0 = time.perf_counter()
                arms(slices)[arm]()
                sync(dev)
                times[arm].append(time.perf_counter() - t0)
                print(f"{name} {arm}: {times[arm][-1]:.2f} s", flush=True)
        flops = forward_flops(model, stack, dev, slices)
        out[f"inference_network_{name}"] = mine
        out[f"seconds_per_volume_{name}"] = median(times[mine])
        out[f"seconds_per_volume_{name}_monai"] = median(times["monai"])
        for arm in ("folded", "unfolded", "compiled", "folded_release_memory"):
            out[f"seconds_per_volume_{name}_{arm}"] = median(times[f"ours_{arm}"])
            out[f"inference_vs_monai_ratio_{name}_{arm}"] = median(times["monai"]) / median(times[f"ours_{arm}"])
        out[f"inference_vs_monai_ratio_{name}"] = median(times["monai"]) / median(times[mine])
        out[f"inference_gflop_{name}"] = flops / 1e9
    peak = max(peak, matmul_peak(PEAK_DTYPE[precision], dev))
    for name in ("2d", "depth5"):  # the best peak of the run's start and end
        for suffix in ("", "_compiled"):
            out[f"inference_mfu_{name}{suffix}"] = (out[f"inference_gflop_{name}"] * 1e9
                                                    / out[f"seconds_per_volume_{name}{suffix}"] / peak)
    out["matmul_peak_tflops"] = peak / 1e12
    out["inference_vs_monai_ratio"] = min(out["inference_vs_monai_ratio_2d"], out["inference_vs_monai_ratio_depth5"])
    out["inference_mfu"] = min(out["inference_mfu_2d"], out["inference_mfu_depth5"])
    out["inference_mfu_compiled"] = min(out["inference_mfu_2d_compiled"], out["inference_mfu_depth5_compiled"])
    out["inference_vs_monai_ratio_compiled"] = min(out["inference_vs_monai_ratio_2d_compiled"],
                                                   out["inference_vs_monai_ratio_depth5_compiled"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=252)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    print(json.dumps(run(args.slices, args.repeats, args.precision, args.batch), indent=2))


if __name__ == "__main__":
    main()
