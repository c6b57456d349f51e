"""Checkpoints of training runs: the run's config beside them, and their weights loaded without executing code."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from landmark_unet.errors import InputError


def load_run_config(ckpt: Path) -> tuple[DictConfig, Path]:
    """The training config of the run that wrote ``ckpt`` (``<run>/checkpoints/<name>.ckpt``) and the run folder.

    Raises:
        InputError: the checkpoint is missing, or has no run config beside it.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise InputError(ckpt, "checkpoint file is missing")
    run_dir = ckpt.resolve().parent.parent
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise InputError(ckpt, f"no run config beside the checkpoint (expected {path})")
    return OmegaConf.load(path), run_dir


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Load the state dict of a Lightning checkpoint into ``model`` (``weights_only``: no code from the file runs).

    Raises:
        InputError: unreadable file, not a Lightning checkpoint, or weights of another model.
    """
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input
        raise InputError(ckpt, f"cannot read checkpoint ({err.__class__.__name__})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise InputError(ckpt, "not a Lightning checkpoint (no state_dict)")
    try:
        missing, unexpected = model.load_state_dict(state["state_dict"], strict=False)
    except RuntimeError as err:  # same names, other shapes
        raise InputError(ckpt, f"does not fit the model of its run ({str(err).splitlines()[1].strip()[:120]})") from None
    if missing or unexpected:
        raise InputError(ckpt, f"does not fit the model of its run ({len(missing)} missing, {len(unexpected)} unexpected keys)")
