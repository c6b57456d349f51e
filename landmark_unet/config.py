"""Config helpers shared by the entry points: OmegaConf resolvers, validation of the top-level keys, precision."""

from __future__ import annotations

import logging
import warnings

from omegaconf import DictConfig, OmegaConf

from landmark_unet.data.organs import ORGANS
from landmark_unet.errors import InputError
from landmark_unet.landmarks.distance import map_channels

CONTENTS = {"fat": ["fat"], "water": ["water"], "both": ["fat", "water"], "single": ["single"]}


def organs_of(organ: str) -> list[str]:
    """``organ=liver`` -> ["liver"]; ``organ=all`` -> every organ."""
    return list(ORGANS) if organ == "all" else [organ]


def register_resolvers() -> None:
    """``${organs:${organ}}``, ``${channels:${content}}``, ``${len:...}`` and
    ``${map_channels:${landmarks.combine},${landmarks.pairs}}`` for the configs."""
    for name, fn in {
        "organs": organs_of,
        "channels": lambda content: list(CONTENTS.get(content, [content])),
        "len": lambda x: len(x),
        "map_channels": map_channels,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def validate(cfg: DictConfig) -> None:
    """Check the top-level experiment keys before anything is built.

    Raises:
        InputError: unknown ``organ`` or ``content``.
    """
    organ = cfg.get("organ")
    if organ not in (*ORGANS, "all"):
        raise InputError("organ", f"unknown organ {organ!r} (choose from {', '.join(ORGANS)}, all)")
    content = cfg.get("content")
    if content not in CONTENTS:
        raise InputError("content", f"unknown content {content!r} (choose from {', '.join(CONTENTS)})")


def resolve_precision(precision: str | int) -> str | int:
    """``auto``: bf16 mixed precision on a GPU that supports it, fp16 mixed on other GPUs, fp32 on the CPU."""
    if str(precision) != "auto":
        return precision
    import torch

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_third_party() -> None:
    """Silence third-party chatter that says nothing about the run (advertising tips, internal deprecations,
    a log-interval hint for our epoch-level metrics)."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropTips())
    logging.getLogger("alembic").setLevel(logging.WARNING)  # optuna's database layer, imported with MONAI
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*always_return_as_numpy.*")  # inside MONAI's surface metrics
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer`.*")  # augmentation, on purpose
    # Dice is logged from PerBodyDice, whose counts are already gathered from every DDP rank
    warnings.filterwarnings("ignore", message=r".*self.log\('(val|test)/dice.*sync_dist=True.*")
