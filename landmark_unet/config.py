"""Config helpers shared by the entry points: OmegaConf resolvers, validation of the top-level keys, precision, and
the YAML files a run leaves in its ``.hydra`` folder."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from landmark_unet.data.layouts import check_dataset_root
from landmark_unet.data.organs import ORGANS
from landmark_unet.errors import InputError, input_error_of, message_line
from landmark_unet.landmarks.distance import COMBINES, ENCODINGS, SPACES, UNITS, map_channels

CONTENTS = {"fat": ["fat"], "water": ["water"], "both": ["fat", "water"], "single": ["single"]}


def organs_of(organ: str) -> list[str]:
    """``organ=liver`` -> ["liver"]; ``organ=all`` -> every organ."""
    return list(ORGANS) if organ == "all" else [organ]


def _output_channels(head: str, organs: list) -> int:
    from landmark_unet.heads import output_channels  # imports torch: only when a model config is resolved

    return output_channels(head, organs)


def slices_or_patches(stack: int, slices, patches):
    """``${slices_or_patches:${data.stack},A,B}``: A for a slice network (``data.stack`` 1 or 5), B for a volumetric
    patch network (``data.stack=0``); e.g. experiment=quick's batch size, 8 slices or 2 patches."""
    return patches if int(stack) == 0 else slices


def register_resolvers() -> None:
    """``${organs:${organ}}``, ``${channels:${content}}``, ``${len:...}``,
    ``${map_channels:${landmarks.combine},${landmarks.pairs}}``, ``${output_channels:${head},${data.organs}}`` and
    ``${slices_or_patches:${data.stack},A,B}`` for the configs."""
    for name, fn in {
        "organs": organs_of,
        "channels": lambda content: list(CONTENTS.get(content, [content])),
        "len": lambda x: len(x),
        "map_channels": map_channels,
        "output_channels": _output_channels,
        "slices_or_patches": slices_or_patches,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def instantiate_setting(node, **kwargs):
    """``hydra.utils.instantiate(node, **kwargs)``, with a constructor that rejects its arguments reported as bad
    input: its ValueError, TypeError (an unknown or missing argument) or Lightning's MisconfigurationException
    becomes an :class:`InputError` naming the config key Hydra was instantiating (``model.net``, ``trainer``) and
    the constructor's message (``error: model.net: in_channels, features and depth must be >= 1, got 2, -1, 4``).

    Raises:
        InputError: as above.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if input_error_of(err) is not None or not _rejects_arguments(cause):
            raise
        key = re.search(r"^full_key: (\S+)$", str(err), re.MULTILINE)  # Hydra's report names the node
        message = message_line(cause)
        where = _argument_named(node, key.group(1), message) if key else "config"
        raise InputError(where, message) from err


def _argument_named(node, where: str, message: str) -> str:
    """``<where>.<key>`` when the constructor's message names exactly one argument of the node at ``where``: its key
    as a word (``Precision 'fp13' is invalid`` -> ``trainer.precision``) or its value, if a string (``No supported
    gpu backend found!`` -> ``trainer.accelerator``); otherwise ``where``."""
    parts = where.split(".")
    for i in range(len(parts) + 1):  # the node at ``where``, found inside ``node`` (Hydra names it from the root)
        target = node if i == len(parts) else OmegaConf.select(node, ".".join(parts[i:]), default=None)
        if isinstance(target, DictConfig):
            break
    else:
        return where

    def named(key: str, value) -> bool:
        words = [key] + ([value] if isinstance(value, str) and len(value) > 1 else [])
        return any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", message, re.IGNORECASE) for w in words)

    keys = [k for k, v in target.items_ex(resolve=False) if not str(k).startswith("_") and named(str(k), v)]
    return f"{where}.{keys[0]}" if len(keys) == 1 else where


def _rejects_arguments(err: BaseException | None) -> bool:
    return isinstance(err, (ValueError, TypeError)) or any(
        cls.__name__ == "MisconfigurationException" for cls in type(err).__mro__)


def validate(cfg: DictConfig) -> None:
    """Check the experiment keys before anything is built or read, so that a bad setting stops the run at once
    with the key named (rather than as a shape error inside the first training step).

    Checked: ``organ`` and ``content`` are known; the landmark-map settings (:func:`validate_landmarks`); the
    augmentation ranges (:func:`validate_augmentation`); the network agrees with the data
    (:func:`validate_model_inputs`); a real dataset's ``data.root`` is a folder. Keys a config lacks are not
    checked. What the constructors themselves reject is reported by :func:`instantiate_setting`.

    Raises:
        InputError: naming the key and what is wrong.
    """
    organ = cfg.get("organ")
    if organ not in (*ORGANS, "all"):
        raise InputError("organ", f"unknown organ {organ!r} (choose from {', '.join(ORGANS)}, all)")
    content = cfg.get("content")
    if content not in CONTENTS:
        raise InputError("content", f"unknown content {content!r} (choose from {', '.join(CONTENTS)})")
    if cfg.get("data") is not None and cfg.data.get("source", "phantom") != "phantom":
        check_dataset_root(cfg.data.get("root"))  # a real dataset's folder (before the network's class imports torch)
    validate_head(cfg)
    if cfg.get("landmarks") is not None:
        validate_landmarks(cfg.landmarks)
    if cfg.get("augmentation") is not None:
        validate_augmentation(cfg.augmentation)
    net = OmegaConf.select(cfg, "model.net")
    if net is not None and not isinstance(net, DictConfig):
        raise InputError("model.net", f"must be a network's settings (a mapping with _target_), got {net!r}")
    if net is not None and cfg.get("data") is not None:
        validate_model_inputs(cfg)


def validate_head(cfg: DictConfig) -> None:
    """``head`` is known, and the loss fits it: ``loss=dice_ce`` (a softmax over background + organs) with
    ``head=softmax`` only, and the per-organ sigmoid losses with ``head=sigmoid`` only."""
    from landmark_unet.heads import HEADS

    head = cfg.get("head")
    if head is None:
        return
    if head not in HEADS:
        raise InputError("head", f"unknown head {head!r} (choose from {', '.join(HEADS)})")
    loss = str(OmegaConf.select(cfg, "model.loss._target_") or "")
    softmax_loss = loss.endswith(".DiceCELoss")
    if loss and softmax_loss != (head == "softmax"):
        raise InputError("head" if head == "softmax" else "loss",
                         "head=softmax needs loss=dice_ce" if head == "softmax"
                         else "loss=dice_ce needs head=softmax (one softmax over background + the organs)")


def validate_landmarks(landmarks: DictConfig) -> None:
    """The ``landmarks`` group: known map ``encoding``, ``units``, ``space`` and ``combine``; ``pairs`` >= 1;
    ``sigma_mm`` > 0."""
    for key, allowed in (("encoding", ENCODINGS), ("units", UNITS), ("space", SPACES), ("combine", COMBINES)):
        value = landmarks.get(key)
        if value is not None and value not in allowed:
            raise InputError(f"landmarks.{key}", f"unknown value {value!r} (choose from {', '.join(allowed)})")
    pairs = landmarks.get("pairs")
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1):
        raise InputError("landmarks.pairs", f"must be a whole number >= 1, got {pairs!r}")
    sigma = landmarks.get("sigma_mm")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0):
        raise InputError("landmarks.sigma_mm", f"must be a number > 0, got {sigma!r}")


def is_number(value) -> bool:
    """A real number of the config (an int or a float; a bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_augmentation(augmentation: DictConfig) -> None:
    """The ``augmentation`` group: ``rotation``, ``scale`` and ``shear`` are ranges ``[low, high]`` of numbers with
    low <= high (degrees; a zoom factor above 0 for scale); ``p`` is a probability."""
    for key in ("rotation", "scale", "shear"):
        value = augmentation.get(key)
        if value is None:
            continue
        pair = list(value) if OmegaConf.is_list(value) else None
        if pair is None or len(pair) != 2 or not all(map(is_number, pair)) or pair[0] > pair[1]:
            raise InputError(f"augmentation.{key}", f"must be a range [low, high] of two numbers with low <= high, "
                                                    f"got {OmegaConf.to_object(value) if pair else value!r}")
        if key == "scale" and pair[0] <= 0:
            raise InputError("augmentation.scale", f"zoom factors must be above 0, got {pair}")
    p = augmentation.get("p")
    if p is not None and not (is_number(p) and 0 <= p <= 1):
        raise InputError("augmentation.p", f"must be a probability in [0, 1], got {p!r}")


def validate_model_inputs(cfg: DictConfig) -> None:
    """The network (``model.net``) can take what the data module feeds it.

    - fusion: with ``data.fusion`` early or late, the samples carry landmark maps, so the network must have a
      ``fusion`` argument set to the same mode (and no fusion when the data has no maps); its ``map_channels`` must
      be the number of maps the ``landmarks`` settings make (one, or one per pair with ``combine=channels``);
    - slices: ``data.stack`` must be the number of slices the network takes (its class's ``stack_depth``: 1 for
      the 2D U-Nets, 5 for the depth-5 network);
    - sizes: a U-Net of ``depth`` pooling levels needs H and W divisible by ``2**depth``, so ``data.pad_multiple``
      must be a multiple of it, and a training ``data.crop`` a positive multiple of ``data.pad_multiple``.
    """
    net, data = cfg.model.net, cfg.data
    for key in ("features", "depth"):  # before the checks below, which take them for granted
        value = net.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise InputError(f"model.net.{key}", f"must be a whole number >= 1, got {value!r}")
    target = net.get("_target_")
    name = str(target).rsplit(".", 1)[-1]
    fusion = data.get("fusion", "none")
    if "fusion" not in net:
        if fusion not in (None, "none"):
            raise InputError("fusion", f"{fusion} fusion feeds landmark maps, but model.net ({name}) has no input "
                                       f"for them (no fusion argument); use fusion=none")
    elif net.fusion != fusion:
        raise InputError("model.net.fusion", f"is {net.fusion!r} but the data module feeds fusion={fusion} "
                                             f"(keep model.net.fusion=${{fusion.mode}} and choose fusion=...)")
    elif fusion != "none" and "map_channels" in net and cfg.get("landmarks") is not None:
        expected = map_channels(cfg.landmarks.get("combine", "sum"), cfg.landmarks.get("pairs", 1))
        if net.map_channels != expected:
            raise InputError("model.net.map_channels", f"is {net.map_channels} but the landmarks settings make "
                                                       f"{expected} map channel(s)")
    stack = data.get("stack", 1)
    if target is not None:
        from hydra.utils import get_class

        try:
            cls = get_class(str(target))
        except Exception as err:  # noqa: BLE001 - Hydra's own error for a target that cannot be imported
            raise InputError("model.net._target_", f"cannot import {target!r} ({err.__class__.__name__})") from None
        takes = getattr(cls, "stack_depth", 1)
        if stack != takes:
            raise InputError("data.stack", f"is {stack} but model.net ({name}) takes {takes} slice(s) per sample "
                                           f"({'model=unet3d' if stack == 5 else 'data.stack=' + str(takes)})")
    depth = net.get("depth")
    pad = data.get("pad_multiple", 16)
    if stack == 0 and net.get("pool_kernels") is not None:
        from landmark_unet.models.unet3d_full import size_multiple

        multiple = size_multiple(net.pool_kernels)
        patch = list(data.get("patch_size") or [])
        if len(patch) != 3 or any(not isinstance(p, int) or p < m or p % m for p, m in zip(patch, multiple)):
            raise InputError("data.patch_size", f"is {patch}, but model.net.pool_kernels need [z, x, y] sizes "
                                                f"divisible by {list(multiple)}")
    elif isinstance(depth, int) and depth >= 1:
        if not isinstance(pad, int) or pad < 1 or pad % 2**depth:
            raise InputError("data.pad_multiple", f"is {pad}, but a U-Net of depth {depth} needs slice sizes "
                                                  f"divisible by {2**depth}: use a multiple of {2**depth}")
    levels = net.get("deep_supervision", 0)
    if isinstance(depth, int) and (isinstance(levels, bool) or not isinstance(levels, int)
                                   or not 0 <= levels < depth):
        raise InputError("model.net.deep_supervision", f"must be a whole number from 0 to {depth - 1} (the "
                                                       f"coarser decoder levels of a depth-{depth} U-Net), "
                                                       f"got {levels!r}")
    crop = data.get("crop")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < pad or crop % pad):
        raise InputError("data.crop", f"must be a positive multiple of {pad} (data.pad_multiple), got {crop}"
                                      " (the study's crops: 256 and 208)")


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
    # everything SegmentationModule logs comes from a torchmetrics state (PerBodyDice, VolumeRatio, SampleMean)
    # that compute() has already gathered or summed over every DDP rank (tests/test_distributed.py)
    warnings.filterwarnings("ignore", message=r".*self.log\('(train|val|test)/.*sync_dist=True.*")
    # a run continued mid-epoch leaves out the draws that epoch trained on (data.slices.RankShare)
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    # validation and test shard with EvalShardSampler, which pads nothing: every slice is scored exactly once
    warnings.filterwarnings("ignore", message=r".*Using `DistributedSampler` with the dataloaders.*")


def load_run_config(ckpt: Path) -> tuple[DictConfig, Path]:
    """The training config of the run that wrote ``ckpt`` (``<run>/checkpoints/<name>.ckpt``) and the run folder.

    Raises:
        InputError: the checkpoint is missing, or has no readable run config beside it.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise InputError(ckpt, "checkpoint file is missing")
    run_dir = ckpt.resolve().parent.parent
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise InputError(ckpt, f"no run config beside the checkpoint (expected {path})")
    return read_yaml(path), run_dir


def read_yaml(path: Path):
    """A YAML file a run left (``.hydra/config.yaml``, ``overrides.yaml``, ``multirun.yaml``).

    Raises:
        InputError: the file cannot be read or is not YAML.
    """
    try:
        return OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - OSError, yaml's errors, OmegaConf's: the file is bad either way
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise InputError(path, f"cannot read YAML ({err.__class__.__name__}: {first})") from None


def saved_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides a run saved (``<run>/.hydra/overrides.yaml``; [] without one).

    Raises:
        InputError: the file is not YAML, or not a list.
    """
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    overrides = read_yaml(path)
    if not OmegaConf.is_list(overrides):
        raise InputError(path, "is not a list of overrides")
    return [str(o) for o in overrides]
