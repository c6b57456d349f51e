"""Remove cache folders no run has used for a while: ``python -m landmark_unet.prune_cache [older_than_days=30]
[max_gib=50] [dry_run=true]``.

The cache (``paths.cache_dir``) holds one folder per generated phantom (``phantom/<settings hash>/``) and one per
preprocessed subject and fingerprint (``subjects/<subject>-<fingerprint>/``). A changed source file, phantom
setting or preprocessing setting gives new folders and leaves the old ones behind: 50 full-size subjects take
about 4 GB a setting (images and labels). Every run that reads a folder sets its modification time
(:func:`landmark_unet.data.cache.mark_used`), so that time is its last use. Pruning removes the
folders unused for ``older_than_days``, then, with ``max_gib``, the least recently used until the rest fits; a
folder used in the last ``keep_hours`` is never removed. A run marks its folders when it starts, not while it
trains, so ``keep_hours`` must exceed the longest run still training (a removed folder would stop it). A folder is
first renamed to a hidden temporary name, so no reader ever sees it half-removed; one left by a killed prune is
removed by the next.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from landmark_unet.data.cache import remove_stale_builds, temporary_name
from landmark_unet.errors import InputError, exit_on_input_error, run_hydra_main

GIB = 1024**3
KINDS = ("phantom", "subjects")  # the cache's sub-folders that hold prunable folders


@dataclass(frozen=True)
class CacheFolder:
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch (the folder's modification time)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def cache_folders(cache_dir: str | Path) -> list[CacheFolder]:
    """Every phantom and subject folder of the cache, least recently used first (temporary folders aside)."""
    out = []
    for kind in KINDS:
        parent = Path(cache_dir) / kind
        if parent.is_dir():
            for folder in parent.iterdir():
                if folder.is_dir() and not folder.name.startswith("."):
                    out.append(CacheFolder(folder, folder_bytes(folder), folder.stat().st_mtime))
    return sorted(out, key=lambda f: (f.last_used, str(f.path)))


def choose(folders: list[CacheFolder], now: float, older_than_days: float | None, max_gib: float | None,
           keep_hours: float) -> list[CacheFolder]:
    """The folders to remove from ``folders`` (least recently used first): those unused for ``older_than_days``,
    then the least recently used until the rest holds at most ``max_gib``; never one used in the last
    ``keep_hours``."""
    removable = [f for f in folders if now - f.last_used > keep_hours * 3600]
    chosen = [f for f in removable if older_than_days is not None and now - f.last_used > older_than_days * 86400]
    if max_gib is not None:
        left = sum(f.bytes for f in folders) - sum(f.bytes for f in chosen)
        for f in removable:
            if left <= max_gib * GIB:
                break
            if f not in chosen:
                chosen.append(f)
                left -= f.bytes
    return sorted(chosen, key=lambda f: (f.last_used, str(f.path)))


def remove_folder(folder: Path) -> None:
    """Rename ``folder`` to ``.<name>.tmp-<pid>@<host>`` (what a killed cache build leaves, and what
    :func:`remove_stale_builds` removes), then remove it."""
    hidden = temporary_name(folder)
    os.rename(folder, hidden)
    shutil.rmtree(hidden)


def prune_cache(cache_dir: str | Path, older_than_days: float | None = 30, max_gib: float | None = None,
                keep_hours: float = 24, dry_run: bool = False, now: float | None = None
                ) -> tuple[list[CacheFolder], list[CacheFolder]]:
    """Remove the folders :func:`choose` picks (none with ``dry_run``); returns (removed, kept).

    Raises:
        InputError: ``cache_dir`` is not a folder; a limit is negative.
    """
    root = Path(cache_dir)
    if not root.is_dir():
        raise InputError(root, "no such cache folder")
    for key, value in (("older_than_days", older_than_days), ("max_gib", max_gib), ("keep_hours", keep_hours)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise InputError(key, f"must be a number >= 0{' or null' if key != 'keep_hours' else ''}, got {value!r}")
    if not dry_run:
        for kind in KINDS:
            if (root / kind).is_dir():
                remove_stale_builds(root / kind)
    folders = cache_folders(root)
    chosen = choose(folders, time.time() if now is None else now, older_than_days, max_gib, keep_hours)
    if not dry_run:
        for f in chosen:
            remove_folder(f.path)
    return chosen, [f for f in folders if f not in chosen]


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _main(cfg: DictConfig) -> None:
    with exit_on_input_error():
        removed, kept = prune_cache(cfg.cache_dir, cfg.older_than_days, cfg.max_gib, cfg.keep_hours, cfg.dry_run)
    verb = "would remove" if cfg.dry_run else "removed"
    now = time.time()
    for f in removed:
        print(f"{verb} {f.path} ({_size(f.bytes)}, last used {(now - f.last_used) / 86400:.1f} days ago)")
    print(f"{verb} {len(removed)} folders, {_size(sum(f.bytes for f in removed))}; "
          f"kept {len(kept)}, {_size(sum(f.bytes for f in kept))} in {cfg.cache_dir}")


def main() -> None:
    import hydra

    run_hydra_main(hydra.main(version_base="1.3", config_path="../conf", config_name="prune_cache")(_main))


if __name__ == "__main__":
    main()
