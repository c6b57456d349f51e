"""Benchmark: the hip-joint detector's speed at full size and its accuracy on the phantom and the real CT.

Run ``python -m benchmarks.bench_detect`` (prints a summary and the dict) or call :func:`run` (returns a flat dict,
for ``benchmarks/run.py``). Thread pools are limited to one thread before numpy is imported, so the figures are
per core. Never part of the test suite.

* ``detect_seconds_full_size``: :func:`detect_hips` on a 256 x 256 x 252 phantom fat channel (median of 3 subjects,
  after one warm-up); ``detect_file_seconds_full_size`` adds reading the NIfTI file.
* ``detect_phantom_mean_error_mm`` / ``_max_``: Euclidean error of both femoral-head centres (world mm) against the
  generator's truth, fat channel, ``n_subjects`` subjects of seed 0 at ``shape`` (default the study's 256 x 256 x
  252 grid), and the same for the water channel (``detect_phantom_water_*``).
* ``detect_ct_error_mm_right`` / ``_left``: the real CT fixture (with a metal implant in the left proximal femur)
  against the centre of the largest inscribed sphere of each femur mask; absent when ../shared/data/real is.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from landmark_unet.data.phantom import PhantomConfig, generate_subject, write_subject  # noqa: E402
from landmark_unet.errors import InputError  # noqa: E402
from landmark_unet.landmarks.detect import detect_hips, detect_hips_file  # noqa: E402

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _world(voxels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (np.c_[voxels, np.ones(len(voxels))] @ affine.T)[:, :3]


def _errors(det, truth_mm: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.stack([det.right_mm, det.left_mm]) - truth_mm, axis=1)


def ct_errors(real_dir: Path = REAL_DIR) -> dict:
    """Errors (mm) on the real CT fixture against the femur masks' inscribed-sphere centres; {} without it."""
    ct, seg = real_dir / "example_ct.nii.gz", real_dir / "example_seg_fast_force_split.nii.gz"
    if not (ct.is_file() and seg.is_file()):
        return {}
    img = nib.load(str(seg))
    labels = np.asarray(img.dataobj)
    spacing = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    ref = []
    for label in (76, 75):  # femur_right, femur_left
        dist = ndi.distance_transform_edt(labels == label, sampling=spacing)
        ref.append(np.unravel_index(int(np.argmax(dist)), dist.shape))
    t0 = time.perf_counter()
    det = detect_hips_file(ct, modality="ct")
    seconds = time.perf_counter() - t0
    err = _errors(det, _world(np.array(ref, dtype=float), img.affine))
    return {"detect_ct_error_mm_right": float(err[0]), "detect_ct_error_mm_left": float(err[1]),
            "detect_ct_confidence": det.confidence, "detect_ct_seconds": seconds}


def run(n_subjects: int = 20, seed: int = 0, shape: tuple[int, int, int] = (256, 256, 252), n_timing: int = 3) -> dict:
    """Time the detector at full size and measure its errors (see the module docstring for the keys)."""
    full = PhantomConfig()
    generate_subject(seed, 10_000, PhantomConfig(shape=(32, 32, 32)))  # warm-up: imports, tables
    times, file_times = [], []
    with tempfile.TemporaryDirectory(prefix="bench_detect_") as tmp:
        for i in range(n_timing + 1):
            s = generate_subject(seed, 100 + i, full)
            write_subject(s, Path(tmp) / "sub")
            t0 = time.perf_counter()
            detect_hips(s.fat, s.affine, modality="mri-fat")
            t1 = time.perf_counter()
            detect_hips_file(Path(tmp) / "sub" / "fat.nii.gz", modality="mri-fat")
            t2 = time.perf_counter()
            if i > 0:  # the first one is a warm-up
                times.append(t1 - t0)
                file_times.append(t2 - t1)
            del s
    cfg = PhantomConfig(shape=tuple(shape))
    errs = {"fat": [], "water": []}
    conf = {"fat": [], "water": []}
    failed = {"fat": 0, "water": 0}
    for i in range(n_subjects):
        s = generate_subject(seed, i, cfg)
        truth = _world(s.landmarks, s.affine)
        for channel in ("fat", "water"):
            try:
                det = detect_hips(getattr(s, channel), s.affine, modality=f"mri-{channel}")
            except InputError:
                failed[channel] += 1
                continue
            errs[channel].append(_errors(det, truth))
            conf[channel].append(det.confidence)
        del s
    res = {
        "detect_seconds_full_size": statistics.median(times),
        "detect_file_seconds_full_size": statistics.median(file_times),
        "detect_phantom_shape": list(shape),
        "detect_phantom_subjects": n_subjects,
    }
    for channel, key in (("fat", "detect_phantom"), ("water", "detect_phantom_water")):
        e = np.array(errs[channel]) if errs[channel] else np.full((1, 2), np.nan)
        res[f"{key}_mean_error_mm"] = float(np.mean(e))
        res[f"{key}_max_error_mm"] = float(np.max(e))
        res[f"{key}_within_3mm"] = int(np.sum(e.max(axis=1) <= 3.0)) if errs[channel] else 0
        res[f"{key}_not_found"] = failed[channel]
        res[f"{key}_min_confidence"] = float(min(conf[channel])) if conf[channel] else float("nan")
    res.update(ct_errors())
    return res


def main() -> None:
    res = run()
    n = res["detect_phantom_subjects"]
    print(f"detect: {res['detect_seconds_full_size']:.2f} s per 256 x 256 x 252 volume "
          f"({res['detect_file_seconds_full_size']:.2f} s from the file), one core")
    print(f"phantom {tuple(res['detect_phantom_shape'])}, {n} subjects, fat: mean {res['detect_phantom_mean_error_mm']:.2f} mm, "
          f"max {res['detect_phantom_max_error_mm']:.2f} mm, {res['detect_phantom_within_3mm']}/{n} within 3 mm")
    print(f"  water: mean {res['detect_phantom_water_mean_error_mm']:.2f} mm, "
          f"max {res['detect_phantom_water_max_error_mm']:.2f} mm, {res['detect_phantom_water_within_3mm']}/{n} "
          f"within 3 mm, {res['detect_phantom_water_not_found']} not found")
    if "detect_ct_error_mm_right" in res:
        print(f"real CT: right {res['detect_ct_error_mm_right']:.1f} mm, left {res['detect_ct_error_mm_left']:.1f} mm "
              f"(confidence {res['detect_ct_confidence']:.2f})")
    json.dump(res, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
