"""Where a training run starts: afresh, from a checkpoint of its own unfinished attempt, or not at all (done).

A run folder is *done* when it holds ``metrics.json``, which a run writes atomically as its very last step. A run
stopped before that leaves checkpoints: ``checkpoints/last.ckpt`` at the end of every epoch and, when SLURM's
pre-emption signal reached it, Lightning's ``hpc_ckpt_<n>.ckpt`` in the run folder (mid-epoch).

- ``ckpt_path=last`` continues from the newest of them; ``resume=auto`` does the same when there is one and starts
  afresh when there is none. Either looks in the run's own folder (a fixed ``hydra.run.dir``, a sweep re-launched
  into its ``hydra.sweep.dir``, a requeued SLURM job) and, for a single run in Hydra's time-stamped folders, in the
  latest earlier folder beside it whose run had the same overrides and did not finish. The run then continues
  *in that folder*, so that its checkpoints, TensorBoard curves and best-checkpoint tracking stay one run.
- ``ckpt_path=PATH`` continues from that checkpoint, in the new folder.
- ``skip_done=true`` returns at once from a run whose folder is done (a re-launched sweep).

A run continued from an epoch-end checkpoint trains exactly as the uninterrupted run did (see
:class:`~landmark_unet.lit.callbacks.EpochSeed`); from a mid-epoch ``hpc_ckpt`` it finishes the epoch with freshly
drawn batches, so its numbers may differ slightly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from landmark_unet.config import saved_overrides
from landmark_unet.errors import InputError

log = logging.getLogger(__name__)

RESUME_KEYS = ("resume", "ckpt_path", "skip_done")  # how a run is (re)started, not what it computes


def is_done(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the metrics.json of a finished run."""
    try:
        return "test" in json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written of ``checkpoints/last.ckpt`` and ``hpc_ckpt_<n>.ckpt`` in ``run_dir``, if any."""
    run_dir = Path(run_dir)
    found = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def same_run(overrides: list[str]) -> frozenset[str]:
    """The overrides that define what a run computes: all but :data:`RESUME_KEYS`."""
    return frozenset(o for o in overrides if o.lstrip("~+").split("=", 1)[0] not in RESUME_KEYS)


def unfinished_attempt(run_dir: Path, overrides: list[str]) -> Path | None:
    """The latest folder beside ``run_dir`` (Hydra's time-stamped run folders sort by time) of a run with the same
    overrides that has a checkpoint and is not done."""
    run_dir = Path(run_dir)
    if not run_dir.parent.is_dir():
        return None
    want = same_run(overrides)
    for folder in sorted(run_dir.parent.iterdir(), reverse=True):
        if (folder != run_dir and (folder / ".hydra" / "overrides.yaml").is_file() and not is_done(folder)
                and newest_checkpoint(folder) is not None and same_run(saved_overrides(folder)) == want):
            return folder
    return None


@dataclass(frozen=True)
class Start:
    """Where a run writes (``run_dir``) and the checkpoint it continues from (None: from scratch)."""

    run_dir: Path
    checkpoint: Path | None = None


def resolve_start(run_dir: Path, ckpt_path: str | None, resume: str | bool | None, overrides: list[str],
                  look_beside: bool) -> Start:
    """Where and from what a run starts (see the module docstring).

    Args:
        run_dir: the run folder Hydra made for this run.
        ckpt_path: the ``ckpt_path`` setting: None, ``last`` or a checkpoint file.
        resume: the ``resume`` setting: false, or ``auto`` (also ``true``).
        overrides: this run's command-line overrides.
        look_beside: also look for an unfinished earlier attempt beside ``run_dir`` (single runs).

    Raises:
        InputError: ``ckpt_path`` names a missing file, ``ckpt_path=last`` finds nothing to continue, or
            ``resume`` is not false / auto.
    """
    run_dir = Path(run_dir)
    if str(resume).lower() not in ("none", "false", "auto", "true"):
        raise InputError("resume", f"unknown value {resume!r} (choose from false, auto)")
    wants_last = ckpt_path is not None and str(ckpt_path) == "last"
    if ckpt_path is not None and not wants_last:
        if not Path(ckpt_path).is_file():
            raise InputError("ckpt_path", f"checkpoint file {ckpt_path} is missing")
        return Start(run_dir, Path(ckpt_path))
    if not wants_last and str(resume).lower() not in ("auto", "true"):
        return Start(run_dir)
    own = newest_checkpoint(run_dir)
    if own is not None:
        log.info("continuing this run from %s", own)
        return Start(run_dir, own)
    earlier = unfinished_attempt(run_dir, overrides) if look_beside else None
    if earlier is not None:
        ckpt = newest_checkpoint(earlier)
        log.info("continuing the unfinished run %s from %s (this attempt's log stays in %s)", earlier, ckpt,
                 run_dir)
        return Start(earlier, ckpt)
    if wants_last:
        where = f"{run_dir}" + (f" or an unfinished run with the same overrides in {run_dir.parent}"
                                if look_beside else "")
        raise InputError("ckpt_path", f"last: no checkpoint to continue from in {where}")
    log.info("resume=auto: nothing to continue, starting afresh")
    return Start(run_dir)
