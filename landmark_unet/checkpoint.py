"""Checkpoints of training runs: a signature of what their weights mean, and their weights loaded without
executing code (``torch.load(weights_only=True)``) after checking they fit. The run config beside a checkpoint is
read by :func:`landmark_unet.config.load_run_config`."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from landmark_unet.errors import InputError

SIGNATURE_KEY = "landmark_unet"  # the entry of a checkpoint that says what its weights mean


def signature(cfg: DictConfig) -> dict:
    """What the weights of a run's checkpoints mean: network class, fusion, image channels, organs, stack depth,
    landmark-map channels and output head, from its composed config. Stored in every checkpoint
    (:class:`landmark_unet.lit.callbacks.SignatureCallback`)."""
    net = cfg.model.net
    return {"network": str(net._target_).rsplit(".", 1)[-1], "fusion": str(cfg.fusion.mode),
            "channels": [str(c) for c in cfg.data.channels], "organs": [str(o) for o in cfg.data.organs],
            "stack": int(1 if cfg.data.get("stack") is None else cfg.data.stack), "map_channels": int(net.get("map_channels", 1)),
            "head": str(cfg.model.get("head", "sigmoid"))}


# signature keys added later, with the value that checkpoints written before them stand for
SIGNATURE_DEFAULTS = {"head": "sigmoid"}


def read_checkpoint(ckpt: Path) -> dict:
    """A Lightning checkpoint, loaded with ``weights_only=True``: tensors and plain containers only, so no code
    stored in the file can run.

    Raises:
        InputError: missing, truncated or otherwise unreadable file, or not a Lightning checkpoint.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise InputError(ckpt, "checkpoint file is missing")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise InputError(ckpt, "cannot read checkpoint: it holds objects other than tensors and plain data, "
                                   "which could run code when loaded (refused)") from None
        raise InputError(ckpt, f"cannot read checkpoint (corrupt: {_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input
        raise InputError(ckpt, f"cannot read checkpoint (truncated, corrupt or not a torch file: "
                               f"{_first_line(err)})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise InputError(ckpt, "not a Lightning checkpoint (no state_dict)")
    return state


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:100] if text else err.__class__.__name__


def check_checkpoint(ckpt: Path, state: dict, expected: dict, model: nn.Module) -> None:
    """Refuse a checkpoint whose weights mean something else than ``model`` of a run with signature ``expected``:
    another network, fusion, channels, organs, stack or map channels (its signature), or, for a checkpoint without
    one, other parameter names or shapes.

    Raises:
        InputError: naming each difference.
    """
    found = state.get(SIGNATURE_KEY)
    if isinstance(found, dict):
        found = SIGNATURE_DEFAULTS | found
        diffs = [f"{k} {found.get(k)!r} (this run: {v!r})" for k, v in expected.items() if found.get(k) != v]
        if diffs:
            raise InputError(ckpt, "checkpoint of another model: " + "; ".join(diffs))
    own = model.state_dict()
    theirs = state["state_dict"]
    missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    if missing or unexpected:
        raise InputError(ckpt, f"checkpoint of another model ({len(missing)} missing, {len(unexpected)} unexpected "
                               f"weights{', e.g. ' + (missing or unexpected)[0] if missing or unexpected else ''})")
    shapes = [k for k in own if tuple(own[k].shape) != tuple(theirs[k].shape)]
    if shapes:
        k = shapes[0]
        raise InputError(ckpt, f"checkpoint of another model ({len(shapes)} weights of other shapes, e.g. {k} "
                               f"{tuple(theirs[k].shape)}, this model {tuple(own[k].shape)})")


def load_weights(model: nn.Module, ckpt: Path, expected: dict | None = None) -> None:
    """Load the weights of a Lightning checkpoint into ``model`` (``weights_only``: no code from the file runs),
    after :func:`check_checkpoint` against the signature ``expected`` of the model's run.

    Raises:
        InputError: unreadable file, not a Lightning checkpoint, or weights of another model.
    """
    state = read_checkpoint(ckpt)
    check_checkpoint(ckpt, state, expected or {}, model)
    model.load_state_dict(state["state_dict"])
