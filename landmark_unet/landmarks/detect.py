"""Automatic hip-joint (femoral-head centre) detector, without training.

The study (section 3.2) produced its hip landmarks "by searching for round objects in the images and then
choosing the most probable hip joint pixel coordinates based on relative positioning". This module does that,
in millimetres, for any orientation and voxel spacing:

1. **Canonical grid.** The volume is brought to the closest canonical RAS+ orientation (nibabel); every length
   below is in mm and converted to voxels per axis from the spacing, so anisotropic grids are handled.
2. **Head-likeness map.** A modality-specific, outlier-robust intensity normalisation maps the image to a map
   ``b`` (about 0..1) in which a femoral head is a bright ball:

   * ``mri-fat``: the head is fat-bright marrow inside a dark cortical rim: ``b = I / p99(body)``, clipped to
     [0, 1.5] (a multiplicative bias field of +-25 % changes contrasts, not the polarity);
   * ``mri-water``: the head is water-dark inside water-intermediate muscle: ``b = 1 - I / p90(body)``, clipped
     to [0, 1], and 0 outside the body (air is water-dark too);
   * ``ct``: the head is a ball of cancellous bone: HU clipped to a bone window [-100, 600] and scaled to [0, 1],
     so that a metal implant (> 2000 HU) counts as bone, not as a hundred times brighter than bone.

3. **Round candidates** (coarse grid, ~5 mm, block means). A difference-of-Gaussians blob response
   ``G(s) * b - G(1.6 s) * b`` at s = 10, 12.5 and 15.5 mm (balls of radius ~18-28 mm), maximum over scales;
   its local maxima inside the body (at least 20 mm deep) are the candidates (at most 40, strongest first).
4. **Pair by relative position.** Every pair of candidates is scored by
   ``sqrt(response_1 * response_2) * plausibility``, plausibility being the product of Gaussian factors for
   the centre distance (inside 120-220 mm: 1), the height (z) and depth (y) differences (sd 15 mm), and the
   offset of the pair midpoint from the body midline at that height (sd 20 mm); the midpoint must lie inside
   the body (it excludes, e.g., the two knees, which lie in separate legs). The best few pairs are refined.
5. **Refinement** at the native resolution: the image around each centre is resampled (trilinear) on a 2 mm
   isotropic grid and matched (FFT correlation) with a sphere template -- the mean of ``b`` inside a ball of
   radius rho minus its mean in the 5 mm shell just outside -- for rho = 12..30 mm, over +-max(8 mm, 1.5 coarse
   voxels) around the candidate; voxels outside the volume are left out of both means (a head at the edge
   of the field of view). The best (centre, rho) is located to sub-voxel precision by a parabola per axis.
   The pair with the best refined score (refined contrast times plausibility) wins. The subject's right head is
   the one with the larger world x (RAS+: +x is the patient's right).

**Confidence** = plausibility of the chosen pair x ``min(1, c / c_ref)`` with c the weaker refined template
contrast of the two heads (in units of ``b``) and ``c_ref`` = 0.3 (a clearly delineated head); both factors lie
in [0, 1]. A volume without a pair of plausibility >= 0.2 and contrast >= 0.05 raises ``InputError``.

Library: :func:`detect_hips` (array + affine), :func:`detect_hips_file` (a NIfTI file). Command line::

    python -m landmark_unet.landmarks.detect IMAGE.nii.gz --out landmarks.txt [--modality mri-fat|mri-water|ct]

writes ``landmarks.txt`` (DESIGN.md: voxel coordinates of the input file's own grid, line 1 the right head, line
2 the left, a comment line with the mm centres and the confidence), atomically. Bad input: one line
``error: <file>: <problem>`` on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from landmark_unet.errors import InputError, exit_on_input_error

MODALITIES = ("mri-fat", "mri-water", "ct")
PAIR_DISTANCE_MM = (120.0, 220.0)  # femoral-head centre to centre
COARSE_MM = 5.0  # target spacing of the candidate search grid
DOG_SIGMAS_MM = (10.0, 12.5, 15.5)  # DoG scales: balls of radius ~18-28 mm
DOG_RATIO = 1.6
MAX_CANDIDATES = 40
MIN_DEPTH_MM = 20.0  # a head centre lies at least this far inside the body
REFINE_STEP_MM = 2.0
REFINE_RADII_MM = tuple(float(r) for r in range(12, 31, 2))  # template ball radii (marrow ball of the head)
SHELL_MM = 5.0  # template shell thickness (cortex + joint space)
REFINE_PAIRS = 3
CONTRAST_REF = 0.3
MIN_PLAUSIBILITY = 0.2
MIN_CONTRAST = 0.05
CT_WINDOW_HU = (-100.0, 600.0)


@dataclass
class HipDetection:
    """Detected femoral-head centres.

    Attributes:
        right_mm: (3,) world RAS+ mm of the subject's right femoral-head centre.
        left_mm: (3,) world RAS+ mm of the left one.
        voxels: (2, 3) voxel coordinates in the input file's own grid (the ``affine`` given), row 0 right,
            row 1 left.
        confidence: in [0, 1] (plausibility of the pair times the weaker head's template contrast relative to a
            clearly delineated head).
        candidates: number of round candidates that were paired.
    """

    right_mm: np.ndarray
    left_mm: np.ndarray
    voxels: np.ndarray
    confidence: float
    candidates: int


# ----------------------------------------------------------------------------------------------------- helpers


def _block_mean(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Mean over non-overlapping blocks of f voxels per axis (the remainder at the far end is dropped)."""
    n = [s // k for s, k in zip(a.shape, f)]
    a = a[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]]
    if f == (1, 1, 1):
        return np.array(a, dtype=np.float32)
    out = a.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).astype(np.float32, copy=False)
    return out.mean(axis=(1, 3, 5), dtype=np.float32)


class _Normaliser:
    """Point-wise map from image intensity to head-likeness ``b`` (a femoral head is a bright ball)."""

    def __init__(self, modality: str, coarse: np.ndarray, body: np.ndarray):
        self.modality = modality
        vals = coarse[body] if body.any() else coarse.ravel()
        if modality == "mri-fat":
            self.scale = float(np.percentile(vals, 99.0))
        elif modality == "mri-water":
            self.scale = float(np.percentile(vals, 90.0))
        else:
            self.scale = 1.0
        if not math.isfinite(self.scale) or self.scale <= 0:
            self.scale = 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.modality == "mri-fat":
            return np.clip(x / np.float32(self.scale), 0.0, 1.5)
        if self.modality == "mri-water":
            return np.clip(1.0 - x / np.float32(self.scale), 0.0, 1.0)
        lo, hi = CT_WINDOW_HU
        return np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def _body_mask(coarse: np.ndarray, modality: str, csp: np.ndarray) -> np.ndarray:
    """Body mask on the coarse grid: threshold of a smoothed image, holes filled per axial slice, largest part."""
    sm = ndi.gaussian_filter(coarse, sigma=3.0 / csp, mode="nearest")
    if modality == "ct":
        m = sm > -400.0
    else:
        hi = float(np.percentile(sm, 99.0))
        m = sm > 0.15 * hi if hi > 0 else sm > 0
        if modality == "mri-water":  # subcutaneous fat is water-dark: grow over it
            m = ndi.binary_closing(m, iterations=2)
    for k in range(m.shape[2]):
        m[:, :, k] = ndi.binary_fill_holes(m[:, :, k])
    lab, n = ndi.label(m)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == int(np.argmax(sizes))
    if modality == "mri-water":
        r = np.maximum(np.round(12.0 / csp).astype(int), 1)
        st = np.zeros(tuple(2 * r + 1), bool)
        zz, yy, xx = np.meshgrid(*[np.arange(-k, k + 1) * s for k, s in zip(r, csp)], indexing="ij")
        st[(zz ** 2 + yy ** 2 + xx ** 2) <= 12.0 ** 2] = True
        m = ndi.binary_dilation(m, structure=st)
    return m


def _gauss(a: np.ndarray, sigma_mm: float, csp: np.ndarray) -> np.ndarray:
    return ndi.gaussian_filter(a, sigma=sigma_mm / csp, mode="nearest", truncate=3.0)


# ------------------------------------------------------------------------------------------------- refinement


class _Refiner:
    """Sphere-template matching around a centre, on a local isotropic grid resampled from the canonical array."""

    def __init__(self, arr: np.ndarray, spacing: np.ndarray, norm: _Normaliser, search_mm: float):
        self.arr = arr
        self.sp = spacing
        self.norm = norm
        self.h = REFINE_STEP_MM
        self.search = int(math.ceil(search_mm / self.h))
        rmax = max(REFINE_RADII_MM) + SHELL_MM
        self.kr = int(math.ceil(rmax / self.h)) + 1  # kernel half-width (grid steps)
        self.half = self.search + self.kr  # local grid half-width
        n = 2 * self.half + 1
        k = 2 * self.kr + 1
        self.fshape = [sfft.next_fast_len(n + k - 1, real=True)] * 3
        ax = np.arange(-self.kr, self.kr + 1) * self.h
        r = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
        self.kernels = []
        for rho in REFINE_RADII_MM:
            ball = np.clip((rho - r) / self.h + 0.5, 0.0, 1.0)
            outer = np.clip((rho + SHELL_MM - r) / self.h + 0.5, 0.0, 1.0)
            shell = outer - ball
            # correlation = convolution with the flipped kernel; the kernels are symmetric
            self.kernels.append((sfft.rfftn(ball, self.fshape), sfft.rfftn(shell, self.fshape),
                                 float(ball.sum()), float(shell.sum())))
        self._cache: dict[tuple, tuple[np.ndarray, float, float]] = {}

    def _correlate(self, spec: np.ndarray, kspec: np.ndarray) -> np.ndarray:
        full = sfft.irfftn(spec * kspec, self.fshape)
        s = self.search
        c = self.half + self.kr  # index of the local-grid centre in the full convolution
        return full[c - s: c + s + 1, c - s: c + s + 1, c - s: c + s + 1]

    def refine(self, centre_vox: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Refined centre (canonical voxel coordinates), template contrast and ball radius (mm)."""
        key = tuple(np.round(centre_vox, 3))
        if key in self._cache:
            return self._cache[key]
        centre = np.asarray(centre_vox, dtype=np.float64)
        for _ in range(2):  # a second pass when the best match lies on the edge of the search window
            pos, score, rho, edge = self._refine_once(centre)
            if not edge:
                break
            centre = pos
        self._cache[key] = (pos, score, rho)
        return pos, score, rho

    def _refine_once(self, centre: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
        n = 2 * self.half + 1
        off = (np.arange(n) - self.half) * self.h
        coords = [centre[a] + off / self.sp[a] for a in range(3)]
        valid1 = [(c >= -0.5) & (c <= s - 0.5) for c, s in zip(coords, self.arr.shape)]
        grid = np.meshgrid(*coords, indexing="ij")
        vals = ndi.map_coordinates(self.arr, grid, order=1, mode="nearest", prefilter=False)
        b = self.norm(vals).astype(np.float64)
        valid = valid1[0][:, None, None] & valid1[1][None, :, None] & valid1[2][None, None, :]
        partial = not bool(valid.all())
        b *= valid
        spec = sfft.rfftn(b, self.fshape)
        vspec = sfft.rfftn(valid.astype(np.float64), self.fshape) if partial else None
        scores = []
        for bspec, sspec, bsum, ssum in self.kernels:
            sb = self._correlate(spec, bspec)
            ss = self._correlate(spec, sspec)
            if partial:
                nb = np.maximum(self._correlate(vspec, bspec), 1e-6)
                ns = np.maximum(self._correlate(vspec, sspec), 1e-6)
                sc = sb / nb - ss / ns
                sc[(nb < 0.5 * bsum) | (ns < 0.35 * ssum)] = -np.inf  # mostly outside the volume
            else:
                sc = sb / bsum - ss / ssum
            scores.append(sc)
        S = np.stack(scores)  # (radius, x, y, z)
        idx = np.unravel_index(int(np.argmax(S)), S.shape)
        best = float(S[idx])
        if not math.isfinite(best):
            return centre, -np.inf, float(REFINE_RADII_MM[0]), False
        sub = np.zeros(4)
        edge = False
        for a in range(4):
            i = idx[a]
            if 0 < i < S.shape[a] - 1:
                lo = list(idx)
                hi = list(idx)
                lo[a] -= 1
                hi[a] += 1
                f0, fm, fp = best, float(S[tuple(lo)]), float(S[tuple(hi)])
                den = fm - 2 * f0 + fp
                if math.isfinite(den) and den < 0:
                    sub[a] = float(np.clip(0.5 * (fm - fp) / den, -0.5, 0.5))
            elif a > 0:
                edge = True
        rho = REFINE_RADII_MM[0] + (idx[0] + sub[0]) * (REFINE_RADII_MM[1] - REFINE_RADII_MM[0])
        shift_mm = (np.array(idx[1:]) + sub[1:] - self.search) * self.h
        pos = centre + shift_mm / self.sp
        return pos, best, float(rho), edge


# ---------------------------------------------------------------------------------------------------- detector


def _canonical(image: np.ndarray, affine: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    image = np.asanyarray(image)
    while image.ndim > 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 3:
        raise InputError(source, f"expected a 3D volume, found shape {tuple(image.shape)}")
    if 0 in image.shape:
        raise InputError(source, f"volume has an empty axis, shape {tuple(image.shape)}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(source, "affine is missing or not invertible")
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise InputError(source, f"image of type {image.dtype} is not real-valued")
    canon = nib.as_closest_canonical(nib.Nifti1Image(image, affine))
    arr = np.asarray(canon.dataobj, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(source, f"{int((~np.isfinite(arr)).sum())} voxel(s) are NaN or Inf")
    return arr, canon.affine


def _no_pair(source: str, why: str) -> InputError:
    return InputError(source, f"no plausible pair of femoral heads found ({why})")


def detect_hips(image: np.ndarray, affine: np.ndarray, modality: str = "mri-fat", source: str = "<array>") -> HipDetection:
    """Find the two femoral-head centres in a 3D image.

    Args:
        image: (X, Y, Z) array in the grid described by ``affine`` (any orientation, anisotropic spacing).
        affine: (4, 4) voxel -> world (mm) affine of ``image``.
        modality: ``mri-fat`` (fat-bright marrow), ``mri-water`` (water-dark marrow) or ``ct`` (HU).
        source: name used in error messages (the file).

    Returns:
        HipDetection with the centres in world mm, voxel coordinates in ``image``'s own grid (right, left), the
        confidence and the number of candidates.

    Raises:
        InputError: unknown modality, not a 3D volume, a non-invertible affine, NaN/Inf voxels, or no plausible
            pair of femoral heads (e.g. the field of view does not hold the pelvis).
    """
    if modality not in MODALITIES:
        raise InputError("modality", f"unknown modality {modality!r} (choose from {', '.join(MODALITIES)})")
    arr, caff = _canonical(image, affine, source)
    sp = np.sqrt((caff[:3, :3] ** 2).sum(axis=0))
    extent = sp * np.array(arr.shape)
    if extent[0] < PAIR_DISTANCE_MM[0] + 40.0:
        raise _no_pair(source, f"the field of view is only {extent[0]:.0f} mm wide")

    # ---- coarse grid, normalisation, body mask
    f = tuple(int(max(1, round(COARSE_MM / s))) for s in sp)
    if any(s // k < 3 for s, k in zip(arr.shape, f)):
        raise _no_pair(source, f"the volume {tuple(arr.shape)} is too small")
    coarse = _block_mean(arr, f)
    csp = sp * np.array(f)
    body = _body_mask(coarse, modality, csp)
    if not body.any():
        raise _no_pair(source, "no body found")
    norm = _Normaliser(modality, coarse, body)
    b = norm(coarse)
    if modality == "mri-water":
        b = b * body

    # ---- multi-scale DoG blob response
    resp = None
    for s in DOG_SIGMAS_MM:
        r = _gauss(b, s, csp) - _gauss(b, s * DOG_RATIO, csp)
        resp = r if resp is None else np.maximum(resp, r)
    depth = ndi.distance_transform_edt(np.pad(body, 1), sampling=csp)[1:-1, 1:-1, 1:-1]
    size = tuple(int(max(3, 2 * round(12.0 / c) + 1)) for c in csp)
    peaks = (resp == ndi.maximum_filter(resp, size=size, mode="nearest")) & (resp > 0) & (depth >= MIN_DEPTH_MM)
    idx = np.argwhere(peaks)
    if len(idx) < 2:
        raise _no_pair(source, f"{len(idx)} round candidate(s)")
    vals = resp[tuple(idx.T)]
    order = np.argsort(-vals)[:MAX_CANDIDATES]
    idx, vals = idx[order], vals[order]
    # coarse voxel -> canonical voxel (block centre) -> canonical-grid mm (axis-aligned RAS, origin at voxel 0)
    cvox = idx * np.array(f) + (np.array(f) - 1) / 2.0
    cmm = cvox * sp

    # ---- body midline per coarse slice
    xs = np.arange(body.shape[0], dtype=np.float64)
    cnt = body.sum(axis=(0, 1))
    midx = np.where(cnt > 0, (body.sum(axis=1) * xs[:, None]).sum(axis=0) / np.maximum(cnt, 1), np.nan)
    midx_mm = (midx * f[0] + (f[0] - 1) / 2.0) * sp[0]  # canonical-grid mm

    # ---- pair scoring
    pairs = []
    dmin, dmax = PAIR_DISTANCE_MM
    n = len(idx)
    for i in range(n):
        for j in range(n):
            if cmm[i, 0] <= cmm[j, 0]:
                continue  # i = right = larger world x
            d = cmm[i] - cmm[j]
            dist = float(np.linalg.norm(d))
            if dist < dmin - 30.0 or dist > dmax + 30.0:
                continue
            excess = max(0.0, dmin - dist, dist - dmax)
            geo = math.exp(-0.5 * (excess / 10.0) ** 2)
            geo *= math.exp(-0.5 * (d[2] / 15.0) ** 2) * math.exp(-0.5 * (d[1] / 15.0) ** 2)
            mid_c = (idx[i] + idx[j]) / 2.0
            mk = int(round(mid_c[2]))
            mi = tuple(int(round(v)) for v in mid_c)
            if not body[mi]:
                continue
            if math.isfinite(midx_mm[mk]):
                off = (cmm[i, 0] + cmm[j, 0]) / 2.0 - midx_mm[mk]
                geo *= math.exp(-0.5 * (off / 20.0) ** 2)
            if geo < 0.05:
                continue
            pairs.append((math.sqrt(vals[i] * vals[j]) * geo, geo, i, j))
    if not pairs:
        raise _no_pair(source, f"{n} round candidates, none in a left/right arrangement")
    pairs.sort(key=lambda t: -t[0])

    # ---- refine the best few pairs at full resolution
    refiner = _Refiner(arr, sp, norm, search_mm=max(8.0, 1.5 * float(csp.max())))
    best = None
    for _, geo, i, j in pairs[:REFINE_PAIRS]:
        pi, ci, _ = refiner.refine(cvox[i])
        pj, cj, _ = refiner.refine(cvox[j])
        # re-check the geometry with the refined centres
        d = (pi - pj) * sp
        dist = float(np.linalg.norm(d))
        excess = max(0.0, dmin - dist, dist - dmax)
        g = math.exp(-0.5 * (excess / 10.0) ** 2) * math.exp(-0.5 * (d[2] / 15.0) ** 2) \
            * math.exp(-0.5 * (d[1] / 15.0) ** 2)
        g *= _mid_factor(pi, pj, midx_mm, sp, f)
        c = min(ci, cj)
        strength = min(1.0, max(0.0, c) / CONTRAST_REF)
        cand = (g * strength, g, c, pi, pj)
        if best is None or cand[0] > best[0]:
            best = cand
    assert best is not None
    conf, g, c, pi, pj = best
    if g < MIN_PLAUSIBILITY or c < MIN_CONTRAST:
        raise _no_pair(source, f"best pair: plausibility {g:.2f}, contrast {c:.2f}")
    if pi[0] < pj[0]:  # canonical +x is the subject's right
        pi, pj = pj, pi
    wi = (caff @ np.r_[pi, 1.0])[:3]
    wj = (caff @ np.r_[pj, 1.0])[:3]
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    vox = (np.c_[np.stack([wi, wj]), np.ones(2)] @ inv.T)[:, :3]
    return HipDetection(right_mm=wi, left_mm=wj, voxels=vox, confidence=float(np.clip(conf, 0.0, 1.0)),
                        candidates=int(n))


def _mid_factor(pi, pj, midx_mm, sp, f) -> float:
    """Gaussian factor of the pair midpoint's offset from the body midline (canonical voxels in, mm)."""
    zc = (pi[2] + pj[2]) / 2.0
    k = int(np.clip(round((zc - (f[2] - 1) / 2.0) / f[2]), 0, len(midx_mm) - 1))
    if not math.isfinite(midx_mm[k]):
        return 1.0
    off = (pi[0] + pj[0]) / 2.0 * sp[0] - midx_mm[k]
    return math.exp(-0.5 * (off / 20.0) ** 2)


def detect_hips_file(path: str | os.PathLike, modality: str = "mri-fat") -> HipDetection:
    """:func:`detect_hips` on a NIfTI file (loaded with :func:`landmark_unet.data.sources.load_nifti`)."""
    from landmark_unet.data.sources import load_nifti

    img = load_nifti(path)
    return detect_hips(np.asanyarray(img.dataobj), img.affine, modality=modality, source=str(path))


# ------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """``python -m landmark_unet.landmarks.detect IMAGE.nii.gz --out landmarks.txt [--modality ...]``."""
    from landmark_unet.landmarks.io import write_landmarks

    parser = argparse.ArgumentParser(
        prog="python -m landmark_unet.landmarks.detect",
        description="Detect the two hip joints (femoral-head centres) and write landmarks.txt "
                    "(voxel coordinates of the input grid; line 1 the subject's right head, line 2 the left).")
    parser.add_argument("image", help="3D NIfTI image (.nii or .nii.gz)")
    parser.add_argument("--out", required=True, help="landmarks.txt to write")
    parser.add_argument("--modality", choices=MODALITIES, default="mri-fat",
                        help="image contrast: mri-fat (default), mri-water or ct (HU)")
    args = parser.parse_args(argv)
    with exit_on_input_error():
        det = detect_hips_file(args.image, modality=args.modality)
        r, l_ = det.right_mm, det.left_mm
        comment = (f"hip joints detected by landmark_unet.landmarks.detect ({args.modality}) in {Path(args.image).name}\n"
                   f"right {r[0]:.1f} {r[1]:.1f} {r[2]:.1f} mm, left {l_[0]:.1f} {l_[1]:.1f} {l_[2]:.1f} mm (world RAS), "
                   f"confidence {det.confidence:.2f}\n"
                   "voxel coordinates x y z of the input grid: line 1 right, line 2 left")
        try:
            write_landmarks(args.out, det.voxels, comment)
        except OSError as err:
            raise InputError(args.out, f"cannot write ({err.strerror or err.__class__.__name__})") from None
        print(f"right femoral head: {r[0]:.1f} {r[1]:.1f} {r[2]:.1f} mm (RAS)")
        print(f"left femoral head:  {l_[0]:.1f} {l_[1]:.1f} {l_[2]:.1f} mm (RAS)")
        print(f"confidence: {det.confidence:.2f} ({det.candidates} candidates)")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
