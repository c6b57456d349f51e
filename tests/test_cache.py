import functools
import os

import numpy as np
import pytest
from conftest import write_toy_subject

from landmark_unet.data.cache import CacheJob, build_cache, normalise_channel
from landmark_unet.data.organs import ORGANS, organ_bit
from landmark_unet.data.sources import read_folder_subject


def job_for(d):
    files = tuple(str(p) for p in sorted(d.rglob("*")) if p.is_file())
    return CacheJob(name=d.name, files=files, read=functools.partial(read_folder_subject, d))


def test_round_trip(tmp_path):
    d = write_toy_subject(tmp_path / "data", "a", shape=(20, 18, 16))
    (entry,) = build_cache([job_for(d)], tmp_path / "cache")
    subject = read_folder_subject(d)
    assert entry.shape == (20, 18, 16) and entry.channels == ["fat", "water"]
    img = entry.image_volume()
    assert img.dtype == np.float16 and img.shape == (16, 2, 20, 18)
    for c in range(2):
        expected, _ = normalise_channel(subject.image[c], "percentile")
        np.testing.assert_allclose(img[:, c].transpose(1, 2, 0), expected, rtol=1e-3, atol=1e-3)
    labels = entry.label_volume()
    assert labels.dtype == np.uint8
    for organ in ORGANS:
        np.testing.assert_array_equal((labels & organ_bit(organ)) > 0, subject.mask(organ).transpose(2, 0, 1) > 0)
    np.testing.assert_allclose(entry.landmarks, subject.landmarks)
    bits = entry.slice_bits
    assert bits[0] == 0 and bits[3] & organ_bit("liver") and not bits[3] & organ_bit("bladder")


def test_reused_then_rebuilt_when_a_file_changes(tmp_path):
    d = write_toy_subject(tmp_path / "data", "a")
    (e1,) = build_cache([job_for(d)], tmp_path / "cache")
    stamp = os.stat(e1.path / "image.npy").st_mtime_ns
    (e2,) = build_cache([job_for(d)], tmp_path / "cache")
    assert e2.path == e1.path and os.stat(e2.path / "image.npy").st_mtime_ns == stamp
    write_toy_subject(tmp_path / "data", "a", seed=5)  # new content, new mtime
    (e3,) = build_cache([job_for(d)], tmp_path / "cache")
    assert e3.path != e1.path


def test_normalisation_is_part_of_the_fingerprint(tmp_path):
    d = write_toy_subject(tmp_path / "data", "a")
    (a,) = build_cache([job_for(d)], tmp_path / "cache", normalisation="percentile")
    (b,) = build_cache([job_for(d)], tmp_path / "cache", normalisation="zscore")
    assert a.path != b.path


def test_failed_build_leaves_nothing(tmp_path):
    d = write_toy_subject(tmp_path / "data", "a")
    (d / "water.nii.gz").write_bytes(b"garbage")
    with pytest.raises(Exception, match="water.nii.gz"):
        build_cache([job_for(d)], tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_parallel_build_matches_serial(tmp_path):
    dirs = [write_toy_subject(tmp_path / "data", f"s{i}", seed=i) for i in range(3)]
    serial = build_cache([job_for(d) for d in dirs], tmp_path / "c1")
    parallel = build_cache([job_for(d) for d in dirs], tmp_path / "c2", workers=2)
    for a, b in zip(serial, parallel):
        assert a.name == b.name
        np.testing.assert_array_equal(a.image_volume(), b.image_volume())
