"""Pruning the cache: what is chosen (age, least recently used, recent use protected), what is removed, that a run's
use counts as use, and the command line."""

import os
import socket
import time

import pytest
from conftest import assert_clean_failure, run_cli, write_toy_subject

from landmark_unet.data.cache import CacheJob, build_cache
from landmark_unet.data.sources import read_folder_subject
from landmark_unet.prune_cache import GIB, CacheFolder, cache_folders, choose, prune_cache

DAY = 86400.0
NOW = 1.8e9


def fake_cache(root, ages_days: dict[str, float], size: int = 1000):
    """Folders ``<root>/<kind>/<name>`` holding ``size`` bytes each, last used ``ages_days`` before NOW."""
    for rel, age in ages_days.items():
        folder = root / rel
        (folder / "inner").mkdir(parents=True)
        (folder / "inner" / "data.bin").write_bytes(b"x" * (size // 2))
        (folder / "meta.json").write_bytes(b"y" * (size - size // 2))
        os.utime(folder, (NOW - age * DAY, NOW - age * DAY))
    return root


def test_choose_by_age_then_least_recently_used_never_the_recent_ones():
    f = [CacheFolder(f"f{i}", GIB, NOW - age * DAY) for i, age in enumerate([90, 40, 10, 2, 0.01])]
    assert [c.path for c in choose(f, NOW, 30, None, 1)] == ["f0", "f1"]  # unused for 30 days
    assert [c.path for c in choose(f, NOW, None, 2.5, 1)] == ["f0", "f1", "f2"]  # LRU until 2 GiB are left
    assert [c.path for c in choose(f, NOW, 30, 3, 1)] == ["f0", "f1"]  # the age rule already gets it to 3 GiB
    # a folder used within keep_hours stays, whatever the size limit
    assert [c.path for c in choose(f, NOW, None, 0, 1)] == ["f0", "f1", "f2", "f3"]
    assert [c.path for c in choose(f, NOW, None, 0, 0.001)] == ["f0", "f1", "f2", "f3", "f4"]
    assert choose(f, NOW, None, None, 1) == []


def test_prune_removes_whole_folders_and_leaves_nothing_half_removed(tmp_path):
    root = fake_cache(tmp_path / "cache", {"phantom/aaa": 60, "subjects/s0-old": 45, "subjects/s0-new": 1,
                                           "subjects/s1-new": 0.5})
    elsewhere = root / "subjects" / ".s2-x.tmp-999999999@another-host"  # a build on another host: kept
    dead = root / "subjects" / f".s3-x.tmp-999999999@{socket.gethostname()}"  # killed here: removed
    elsewhere.mkdir()
    dead.mkdir()
    removed, kept = prune_cache(root, older_than_days=30, dry_run=True, now=NOW)
    assert sorted(f.path.name for f in removed) == ["aaa", "s0-old"]
    assert len(cache_folders(root)) == 4 and dead.exists()  # a dry run removes nothing
    removed, kept = prune_cache(root, older_than_days=30, now=NOW)
    assert sorted(f.path.name for f in removed) == ["aaa", "s0-old"] and all(f.bytes == 1000 for f in removed)
    assert sorted(f.path.name for f in cache_folders(root)) == ["s0-new", "s1-new"] == sorted(f.path.name for f in kept)
    assert not (root / "phantom" / "aaa").exists()
    assert [p.name for p in (root / "phantom").iterdir()] == []  # no hidden leftover
    assert elsewhere.exists() and not dead.exists()
    with pytest.raises(Exception, match="older_than_days"):
        prune_cache(root, older_than_days=-1)
    with pytest.raises(Exception, match="no such cache folder"):
        prune_cache(tmp_path / "nowhere")


def test_a_run_reading_a_cache_entry_marks_it_used(tmp_path):
    subject = write_toy_subject(tmp_path / "data", "s00")
    job = CacheJob(name="s00", files=tuple(str(p) for p in sorted(subject.rglob("*.nii.gz"))),
                   read=lambda: read_folder_subject(subject))
    entry = build_cache([job], tmp_path / "cache" / "subjects")[0]
    old = time.time() - 40 * DAY
    os.utime(entry.path, (old, old))
    assert [f.path for f in choose(cache_folders(tmp_path / "cache"), time.time(), 30, None, 1)] == [entry.path]
    again = build_cache([job], tmp_path / "cache" / "subjects")[0]  # reused, not rebuilt
    assert again.path == entry.path and time.time() - entry.path.stat().st_mtime < 600
    assert choose(cache_folders(tmp_path / "cache"), time.time(), 30, None, 1) == []


def test_command_line(tmp_path):
    fake_cache(tmp_path / "cache", {"subjects/s0-old": 45, "subjects/s1-new": 0.5})
    old = time.time() - 45 * DAY
    os.utime(tmp_path / "cache" / "subjects" / "s0-old", (old, old))
    os.utime(tmp_path / "cache" / "subjects" / "s1-new", None)
    proc = run_cli("landmark_unet.prune_cache", [], tmp_path)  # the cache of paths.cache_dir
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "removed 1 folders" in proc.stdout and "kept 1" in proc.stdout and "s0-old (" in proc.stdout
    assert [p.name for p in (tmp_path / "cache" / "subjects").iterdir()] == ["s1-new"]
    bad = run_cli("landmark_unet.prune_cache", ["max_gib=-3"], tmp_path)
    assert_clean_failure(bad, "max_gib", "-3", tmp_path=tmp_path)
