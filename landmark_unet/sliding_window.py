"""Whole-body inference of a volumetric patch network (``model=unet3d_full``) by Gaussian-weighted sliding windows.

The body is cut into overlapping patches, each patch's probabilities are weighted by a Gaussian centred on the
patch (the network is least sure near a patch's border) and the weighted probabilities are averaged per voxel
(MONAI's :func:`~monai.inferers.sliding_window_inference`, nnU-Net's scheme: activation first, then the average).

Inputs are laid out like the cache (:mod:`landmark_unet.data.cache`), as for the 2D
:func:`landmark_unet.inference.predict_volume`: the image (Z, C, X, Y), normalised, and the landmark distance maps
(Z', L, X, Y) with Z' = Z, or 1 for in-plane maps. The volume is zero-padded at the high end of each axis (as the
training patches are, :mod:`landmark_unet.data.patches`) and the output cropped back to (K, X, Y, Z).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from landmark_unet.heads import check_head, probabilities
from landmark_unet.inference import autocast

SIGMA_SCALE = 0.125  # Gaussian sigma per axis, as a share of the patch size (nnU-Net's 1/8)


@torch.no_grad()
def predict_volume_3d(
    model: nn.Module,
    image: np.ndarray,
    distance: np.ndarray | None,
    patch_size: Sequence[int],
    size_multiple: Sequence[int] = (1, 1, 1),
    overlap: float = 0.5,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    precision: str = "32-true",
    head: str = "sigmoid",
) -> np.ndarray:
    """Probabilities (K, X, Y, Z) float32, one map per organ, of one body by Gaussian-weighted sliding windows.

    Args:
        model: maps ``(image (B, C, D, H, W)[, distance (B, L, D, H, W)])`` to logits (B, K', D, H, W); already
            in eval mode on ``device`` (the caller's job, e.g.
            :func:`landmark_unet.inference.inference_network`). Runs under ``torch.no_grad``.
        image: (Z, C, X, Y) normalised channels (the cache's ``image.npy``).
        distance: (Z', L, X, Y) landmark maps, Z' = Z or 1 (in-plane maps, the same on every slice), or None for
            a model without fusion; they travel as extra channels through the windowing and are split off again
            before the model is called.
        patch_size: (D, H, W) window, divisible by ``size_multiple``.
        size_multiple: (D, H, W) the model's input sizes must be divisible by (the model's ``size_multiple``);
            the volume is zero-padded at the high end to at least the patch and to a multiple of this.
        overlap: share of the window two neighbours share, per axis, in [0, 1).
        batch_size: windows per forward pass.
        device: where the network runs (the stitched volume lives there too).
        precision: Lightning precision name (``32-true``, ``bf16-mixed``, ``16-mixed``): autocast per
            :func:`landmark_unet.inference.autocast`; activations and the average are in float32.
        head: ``sigmoid``: K' = K logits, a sigmoid each (independent organs, overlaps allowed); ``softmax``:
            K' = K + 1 logits with channel 0 the background, softmax over channels, the background dropped.

    Returns:
        (K, X, Y, Z) float32 probabilities on the input's grid.

    Raises:
        ValueError: unknown head, bad shapes, a patch not divisible by ``size_multiple``, overlap out of range.
    """
    check_head(head)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    patch = tuple(int(p) for p in patch_size)
    multiple = tuple(int(m) for m in size_multiple)
    if len(patch) != 3 or len(multiple) != 3 or min(patch) < 1 or min(multiple) < 1:
        raise ValueError(f"patch_size and size_multiple must be three positive sizes, got {patch_size}, "
                         f"{size_multiple}")
    if any(p % m for p, m in zip(patch, multiple)):
        raise ValueError(f"patch {patch} is not divisible by the model's size multiple {multiple}")
    if image.ndim != 4:
        raise ValueError(f"image must be (Z, C, X, Y), got shape {image.shape}")
    device = torch.device(device)
    z, c, x, y = image.shape
    if distance is not None and (distance.ndim != 4 or distance.shape[0] not in (1, z)
                                 or distance.shape[2:] != (x, y)):
        raise ValueError(f"distance maps must be (Z or 1, L, X, Y) = ({z} or 1, L, {x}, {y}), got {distance.shape}")
    def tensor(a: np.ndarray) -> torch.Tensor:  # a copy: cached arrays are read-only memory maps
        return torch.from_numpy(np.array(a, dtype=np.float32)).to(device)

    image_t = tensor(image)
    maps_t = None if distance is None else tensor(distance)
    prob = stitch(model, image_t, maps_t, patch, multiple, overlap, batch_size, precision, head)
    return prob.permute(0, 2, 3, 1).cpu().numpy()


def window_settings(module: nn.Module) -> dict:
    """The sliding-window arguments of a trained volumetric SegmentationModule (its ``sliding_window`` config and
    its network's ``size_multiple``), as keywords of :func:`predict_volume_3d` and :func:`stitch`."""
    sw = module.sliding_window
    return {"patch_size": tuple(sw["patch_size"]), "size_multiple": tuple(module.net.size_multiple),
            "overlap": float(sw.get("overlap", 0.5)), "batch_size": int(sw.get("batch_size", 2))}


def stitch(model: nn.Module, image: torch.Tensor, distance: torch.Tensor | None, patch_size: Sequence[int],
           size_multiple: Sequence[int], overlap: float, batch_size: int, precision: str,
           head: str) -> torch.Tensor:
    """The core of :func:`predict_volume_3d` on tensors already on the model's device (validation runs it on
    its batches): image (Z, C, X, Y), distance (Z', L, X, Y) or None -> probabilities (K, Z, X, Y) float32."""
    z, c, x, y = image.shape
    patch = tuple(patch_size)
    padded = [max(p, -(-n // m) * m) for n, p, m in zip((z, x, y), patch, size_multiple)]
    channels = c + (0 if distance is None else distance.shape[1])
    vol = image.new_zeros((1, channels, *padded), dtype=torch.float32)  # (1, C [+ L], D, H, W)
    vol[0, :c, :z, :x, :y] = image.float().transpose(0, 1)
    if distance is not None:
        vol[0, c:, :z, :x, :y] = distance.float().transpose(0, 1)  # (L, Z', X, Y) broadcasts along z when Z' = 1

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        img, maps = windows[:, :c], windows[:, c:]
        with autocast(image.device, precision):
            logits = model(img) if distance is None else model(img, maps)
        return probabilities(logits, head)  # activation first, then the Gaussian-weighted average

    prob = sliding_window_inference(vol, roi_size=patch, sw_batch_size=batch_size, predictor=predictor,
                                    overlap=overlap, mode="gaussian", sigma_scale=SIGMA_SCALE,
                                    padding_mode="constant", cval=0.0)
    return torch.as_tensor(prob)[0, :, :z, :x, :y].float()  # a plain tensor, not MONAI's MetaTensor
