"""Post-processing: keep the largest connected component of a mask (the two largest for the kidneys).

Whether it helps is decided per organ on the validation bodies, never the test bodies: the component filter is kept
only where it raises the mean validation Dice (nnU-Net's rule). The choice is recorded in the run's metrics.json
(``postprocess``) and applied by ``predict``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from landmark_unet.metrics import dice_volume

COMPONENTS = {"kidneys": 2}  # organs of more than one part; every other organ keeps one


def largest_components(mask: np.ndarray, organ: str) -> np.ndarray:
    """``mask`` (X, Y, Z) bool with only its largest 26-connected component(s): ``COMPONENTS.get(organ, 1)``."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    keep = COMPONENTS.get(organ, 1)
    if n <= keep:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel())[1:]
    kept = np.argsort(sizes)[::-1][:keep] + 1
    return np.isin(labels, kept)


def choose_on_validation(model, datamodule, device, precision: str = "32-true") -> dict:
    """Per organ of the model, whether the component filter raises the mean Dice over the validation bodies:
    ``{organ: {"largest_component": bool, "val_dice": raw mean, "val_dice_largest_component": filtered mean}}``;
    {} when the run has no validation bodies."""
    from landmark_unet.data.organs import organ_bit
    from landmark_unet.heads import organ_masks
    from landmark_unet.inference import predict_cached

    if not datamodule.split.get("val"):
        return {}
    raw: dict[str, list[float]] = {o: [] for o in datamodule.organs}
    filtered: dict[str, list[float]] = {o: [] for o in datamodule.organs}
    for _, prob, labels, _ in predict_cached(model, datamodule, "val", device, precision):
        masks = organ_masks(prob, model.head, model.threshold, dim=0)
        for k, organ in enumerate(datamodule.organs):
            pred, ref = masks[k], (labels & organ_bit(organ)) > 0
            raw[organ].append(dice_volume(pred, ref))
            filtered[organ].append(dice_volume(largest_components(pred, organ), ref))
    choice = {}
    for organ in datamodule.organs:
        before, after = float(np.mean(raw[organ])), float(np.mean(filtered[organ]))
        choice[organ] = {"largest_component": after > before, "val_dice": before,
                         "val_dice_largest_component": after}
    return choice
