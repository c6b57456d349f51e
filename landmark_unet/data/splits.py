"""Subject splits: the study's rounds (k folds over subjects) and a validation split of the training subjects.

The study used 5 rounds of 40 training and 10 test subjects out of 50, and chose hyperparameters on 15 % of the
training subjects. :func:`make_split` gives round ``r`` of ``k`` folds: the subjects are shuffled once with
``seed``, cut into ``k`` near-equal folds, fold ``r`` is the test set and a seeded ``val_fraction`` of the rest
the validation set. Splits are always over subjects, never over slices.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from landmark_unet.data.nifti import atomic_write_bytes
from landmark_unet.errors import InputError


def make_split(
    names: Sequence[str], rounds: int = 5, round: int = 0, val_fraction: float = 0.15, seed: int = 0
) -> dict[str, list[str]]:
    """Train / val / test subject names for one round.

    Args:
        names: all subject names (order does not matter: they are sorted first).
        rounds: number of folds (the study: 5).
        round: which fold is the test set, 0 <= round < rounds.
        val_fraction: share of the non-test subjects held out for validation (the study: 0.15); at least one
            subject when > 0.
        seed: shuffling seed.

    Raises:
        InputError: ``data.split.*`` values that cannot give non-empty train and test sets.
    """
    names = sorted(names)
    if rounds < 2:
        raise InputError("data.split.rounds", f"needs at least 2 rounds, got {rounds}")
    if not 0 <= round < rounds:
        raise InputError("data.split.round", f"must be in [0, {rounds - 1}], got {round}")
    if len(names) < rounds:
        raise InputError("data.split.rounds", f"{rounds} rounds need at least {rounds} subjects, found {len(names)}")
    if not 0 <= val_fraction < 1:
        raise InputError("data.split.val_fraction", f"must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    folds = np.array_split(np.arange(len(order)), rounds)
    test = sorted(order[i] for i in folds[round])
    rest = [order[i] for i in range(len(order)) if i not in set(folds[round].tolist())]
    n_val = 0 if val_fraction == 0 else max(1, int(round_half_up(val_fraction * len(rest))))
    if n_val >= len(rest):
        raise InputError("data.split.val_fraction", f"leaves no training subject ({len(rest)} non-test subjects)")
    val_idx = set(np.random.default_rng([seed, round]).permutation(len(rest))[:n_val].tolist())
    val = sorted(rest[i] for i in val_idx)
    train = sorted(rest[i] for i in range(len(rest)) if i not in val_idx)
    return {"train": train, "val": val, "test": test}


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def save_split(path: str | Path, split: dict, **info) -> None:
    """Write ``split`` (and any extra ``info``) to ``path`` as JSON, atomically."""
    atomic_write_bytes(path, json.dumps({**info, **split}, indent=2).encode())


def load_split(path: str | Path) -> dict[str, list[str]]:
    """Read a splits.json written by :func:`save_split`.

    Raises:
        InputError: missing file, not JSON, or no ``train`` / ``test`` lists.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "splits file is missing") from None
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read splits file ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object with 'train' and 'test' lists, found a {type(data).__name__}")
    for key in ("train", "test"):
        if not isinstance(data.get(key), list):
            raise InputError(path, f"no '{key}' list of subject names")
    data.setdefault("val", [])
    return data
