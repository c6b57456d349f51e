"""Whole-volume inference: every axial slice (or depth-5 stack) of one body through a trained network.

Inputs are laid out like the cache (:mod:`landmark_unet.data.cache`): the image (Z, C, X, Y), normalised, and the
landmark distance maps (Z', L, X, Y) with Z' = Z, or 1 for in-plane maps. Slices are zero-padded at the high end of
x and y (as in training and evaluation), run in batches on one device, and the sigmoid probabilities cropped back.
The output is (K, X, Y, Z): one probability map per organ on the canonical grid of the input. A volumetric patch
network (``stack=0``, ``model=unet3d_full``) runs by Gaussian-weighted sliding windows instead
(:mod:`landmark_unet.sliding_window`), with the same inputs and output.

Test-time augmentation (``tta=True``) averages the probabilities over flips that keep the patient's left and right
apart: the anterior-posterior axis (y) and, for depth-5 stacks and 3D patches, the order of the slices (z). A
left-right mirror
would turn the right kidney into a left one and put the liver where the spleen belongs, so it is never used.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from landmark_unet.heads import probabilities

# flips of a (B, C, [D,] H, W) batch: H is x (left-right, never flipped), W is y (anterior-posterior), D is z
TTA_2D = ((), (-1,))
TTA_STACK = ((), (-1,), (2,), (2, -1))
TTA_VOLUME = ((), (3,), (0,), (0, 3))  # on the (Z, C, X, Y) volume: none, y, z, both


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for Lightning's precision names: bf16 for ``bf16*``, fp16 for ``16*`` on a GPU, else nothing."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode network with each BatchNorm that directly follows a convolution in an
    ``nn.Sequential`` folded into that convolution's weights and bias (``torch.nn.utils.fusion``), the BatchNorm
    replaced by an identity: the same function in one pass over the feature map instead of two. ``model`` is left
    unchanged; a model in training mode (batch statistics) is returned as it is."""
    if model.training:
        return model
    folded = copy.deepcopy(model)
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(1, len(seq)):
            conv, bn = seq[i - 1], seq[i]
            if isinstance(conv, nn.modules.conv._ConvNd) and not isinstance(conv, nn.modules.conv._ConvTransposeNd) \
                    and isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                seq[i - 1] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                seq[i] = nn.Identity()
    return folded


def inference_network(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """``model`` as whole-volume inference runs it: in eval mode on ``device`` and, on the CPU, with its BatchNorm
    folded (:func:`fold_batchnorm`: 1.2x there). On a GPU the folded copy measured slower (0.92x on an H200,
    ``benchmarks/bench_inference``), so it runs unfolded. Call once per model, not once per volume.

    ``compile``: also ``torch.compile`` it. On the CPU with Inductor's freezing (the weights become constants, so
    oneDNN fuses each convolution with its bias and ReLU; benchmarks/README.md); on a GPU with CUDA graphs
    (``mode="reduce-overhead"``; not measured yet). The first batch of each slice size compiles (seconds to a
    minute); :func:`predict_volume` fills a compiled network's last batch, so bodies of any depth share it."""
    model = model.eval().to(device)
    cpu = torch.device(device).type == "cpu"
    net = fold_batchnorm(model) if cpu else model
    if compile:
        net = torch.compile(net, options={"freezing": True}) if cpu else torch.compile(net, mode="reduce-overhead")
    return net


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (it recompiles for every new input shape)."""
    return hasattr(model, "_orig_mod")


def _padded(n: int, multiple: int, at_least: int = 0) -> int:
    return max(-(-n // multiple) * multiple, at_least)


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    distance: np.ndarray | None = None,
    stack: int = 1,
    batch_size: int = 16,
    size: tuple[int, int] | None = None,
    pad_multiple: int = 16,
    tta: bool = False,
    device: str | torch.device = "cpu",
    precision: str = "32-true",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Probabilities (K, X, Y, Z) float32 of every organ the model predicts, for one body.

    Args:
        model: maps ``(image (B, C, H, W) or (B, C, D, H, W)[, distance])`` to logits (B, K, H, W); in eval mode
            on ``device`` (:func:`inference_network` prepares it).
        image: (Z, C, X, Y) normalised channels (the cache's ``image.npy``).
        distance: (Z', L, X, Y) landmark maps, Z' = Z or 1, or None for a model without fusion.
        stack: 1 (2D slices) or the depth of a stack (5: slices k-2 .. k+2, the edge repeated).
        batch_size: slices per forward pass.
        size: padded in-plane (H, W) at least (training's size keeps predictions identical to evaluation's);
            default: (X, Y) rounded up to ``pad_multiple``.
        pad_multiple: H and W are divisible by this (16 for a 4-level U-Net).
        tta: average over the flips of :data:`TTA_2D` / :data:`TTA_STACK`.
        device: where the network runs.
        precision: Lightning precision name (``32-true``, ``bf16-mixed``, ``16-mixed``).
        progress: called with the number of slices done after each batch.
    """
    device = torch.device(device)
    head = getattr(model, "head", "sigmoid")  # a SegmentationModule's; a bare network has sigmoid outputs
    if stack == 0:
        return _predict_volumetric(model, image, distance, tta, device, precision, head)
    z, c, x, y = image.shape
    h = _padded(x, pad_multiple, size[0] if size else 0)
    w = _padded(y, pad_multiple, size[1] if size else 0)
    vol = torch.zeros((z, c, h, w), dtype=torch.float32, device=device)
    vol[:, :, :x, :y] = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)
    maps = None
    if distance is not None:
        maps = torch.zeros((distance.shape[0], distance.shape[1], h, w), dtype=torch.float32, device=device)
        maps[:, :, :x, :y] = torch.as_tensor(np.asarray(distance, dtype=np.float32), device=device)
    flips = (TTA_STACK if stack > 1 else TTA_2D) if tta else ((),)
    half = stack // 2
    fill = is_compiled(model)  # a compiled network gets full batches only: one shape, one compilation
    out = None
    for start in range(0, z, batch_size):
        ks = torch.arange(start, min(start + batch_size, z), device=device)
        n = len(ks)
        if fill and n < batch_size:
            ks = torch.cat([ks, ks[-1:].expand(batch_size - n)])  # the last slice again; its outputs are dropped
        if stack == 1:
            batch = vol[ks]
            dist = None if maps is None else maps[ks if maps.shape[0] > 1 else torch.zeros_like(ks)]
        else:
            idx = (ks[:, None] + torch.arange(-half, half + 1, device=device)).clamp(0, z - 1)  # (B, D)
            batch = vol[idx].permute(0, 2, 1, 3, 4)  # (B, C, D, H, W)
            dist = None if maps is None else maps[idx if maps.shape[0] > 1 else torch.zeros_like(idx)].permute(
                0, 2, 1, 3, 4)
        prob = 0
        for dims in flips:
            xin = batch.flip(dims) if dims else batch
            din = None if dist is None else (dist.flip(dims) if dims else dist)
            with autocast(device, precision):
                logits = model(xin) if din is None else model(xin, din)
            p = probabilities(logits, head)
            out_dims = tuple(d for d in dims if d == -1)  # the output is one slice: only the y flip to undo
            prob = prob + (p.flip(out_dims) if out_dims else p)
        prob = (prob[:n] / len(flips))[:, :, :x, :y]  # (B, K, X, Y)
        if out is None:
            out = torch.empty((prob.shape[1], x, y, z), dtype=torch.float32, device="cpu")
        out[..., start:start + n] = prob.permute(1, 2, 3, 0).cpu()
        if progress is not None:
            progress(n)
    assert out is not None
    return out.numpy()


def _predict_volumetric(model: nn.Module, image: np.ndarray, distance: np.ndarray | None, tta: bool,
                        device: torch.device, precision: str, head: str) -> np.ndarray:
    """:func:`predict_volume` of a volumetric patch network (a SegmentationModule with ``sliding_window``
    settings), averaged over :data:`TTA_VOLUME` flips with ``tta``."""
    from landmark_unet.sliding_window import predict_volume_3d, window_settings

    total = 0
    flips = TTA_VOLUME if tta else ((),)
    for dims in flips:
        img = np.flip(image, dims) if dims else image
        maps = distance
        if dims and distance is not None:  # in-plane maps (Z' = 1) have no z to flip
            maps = np.flip(distance, tuple(d for d in dims if d != 0 or distance.shape[0] > 1))
        prob = predict_volume_3d(model, np.ascontiguousarray(img), None if maps is None else np.ascontiguousarray(maps),
                                 device=device, precision=precision, head=head,
                                 **window_settings(model))  # (K, X, Y, Z)
        undo = tuple({0: 3, 3: 2}[d] for d in dims)  # z and y of (Z, C, X, Y) are axes 3 and 2 of (K, X, Y, Z)
        total = total + (np.flip(prob, undo) if undo else prob)
    return np.ascontiguousarray(total / len(flips), dtype=np.float32)


def predict_cached(model: nn.Module, datamodule, part: str, device: torch.device, precision: str = "32-true",
                   progress: bool = False, compile: bool = False):
    """Whole-volume inference of every body of a DataModule's split ``part``, from its cache.

    Yields ``(name, prob, labels, spacing)``: probabilities (K, X, Y, Z) of the model's organs, the packed reference
    labels (X, Y, Z) uint8 (bit :func:`~landmark_unet.data.organs.organ_bit` per organ) and the voxel size in mm.
    The padding is the DataModule's, so that the probabilities equal those of Lightning's validation and test.
    """
    from tqdm import tqdm

    model = inference_network(model, device, compile)  # once, not once per body
    for name in tqdm(datamodule.split[part], desc=part, unit="body", disable=not progress, leave=False):
        entry = datamodule.entries[name]
        image = np.asarray(entry.image_volume()[:, datamodule.channel_index])
        distance = entry.distance_volume(datamodule.distance_key) if datamodule.fusion != "none" else None
        prob = predict_volume(model, image, distance, stack=datamodule.stack, batch_size=datamodule.eval_batch_size,
                              size=datamodule.size, pad_multiple=datamodule.pad_multiple, device=device,
                              precision=precision)
        yield name, prob, np.asarray(entry.label_volume()).transpose(1, 2, 0), np.asarray(entry.meta["spacing"])
