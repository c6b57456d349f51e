"""Automatic hip-joint (femoral-head centre) detector, without training.

The study (section 3.2) produced its hip landmarks "by searching for round objects in the images and then
choosing the most probable hip joint pixel coordinates based on relative positioning". This module does that in
millimetres, for any orientation and (anisotropic) voxel spacing, in five steps:

1. **Canonical grid.** The volume is reoriented to the closest canonical RAS+ orientation (nibabel); every length
   below is in mm and converted to voxels per axis from the spacing.
2. **Head-likeness map** ``b`` (about 0..1), robust to a bias field and to outliers, in which a femoral head is a
   bright ball inside a darker rim:

   * ``mri-fat``: fat-bright marrow inside a dark cortex and joint space: ``b = I / p99(body)``, clipped to
     [0, 1.5];
   * ``mri-water``: the head (marrow and cortex) is water-dark inside water-intermediate muscle:
     ``b = 1 - I / p90(body)``, clipped to [0, 1] (0 outside the body on the coarse grid: air is water-dark too);
   * ``ct``: HU in a bone window [-100, 600] scaled to [0, 1]; metal (> 1800 HU, e.g. the implant in the left
     proximal femur of the real CT fixture) is first replaced by 300 HU (cancellous bone), so that a screw is
     neither a hundred times brighter than bone nor a bright spot that pulls the search.

3. **Round candidates** on a coarse grid (~6 mm, block means): local maxima (within 12 mm) of a
   difference-of-Gaussians blob response ``G(s) * b - G(1.6 s) * b``, s = 10, 12.5, 15.5 mm (balls of radius
   ~18-28 mm), maximum over scales, inside the body mask and at least 20 mm deep.
4. **Pairs by relative position** (:class:`_Geometry`), a plausibility in [0, 1]: the product of the centre
   distance (1 within 120-220 mm, Gaussian sd 10 mm outside), the height (z) and depth (y) differences (sd 15 mm),
   the offset of the pair midpoint from the body midline at its height (sd 20 mm), each head's position in the
   body's antero-posterior extent (mid-depth, ~55 % from the back, sd 12 %), and a trunk over the pair: the
   body's AP extent on the midline at the pair's height and 40 and 80 mm higher (60 mm -> 0, 150 mm -> 1); the
   midpoint must lie in the body. Two knees, two thighs or two ischial tuberosities fail one of these.
5. **Sphere template** (:class:`_Refiner`), on a local isotropic grid resampled (trilinear) from the full-
   resolution volume: zones ball (radius rho), ring (4 mm: cortex, cartilage, joint space) and outer shell (8 mm:
   socket, muscles); score ``mean(ball) - 2 mean(ring) + mean(outer)``, high for a bright ball in a dark rim
   inside something brighter than that rim -- a ball-and-socket joint, not a ball merged with its socket.
   Head-sized radii only (per modality, e.g. 16-28 mm for the marrow ball in mri-fat); a position where a
   smaller ball matches better is not a head (ischial tuberosity, femoral neck). Voxels outside the volume are
   left out of the means; the ball and the ring must lie in the field of view. The candidates of the plausible
   pairs are screened (3 mm grid, +-9 mm, FFT correlation; 2 mm for mri-water, whose joint space is thin), the
   pairs ranked by ``score_right * score_left * plausibility``, the best few re-scored on the 2 mm grid, and the
   best pair refined (2 mm grid, +-6 mm, sub-voxel by a parabola per axis). The subject's right head is the one
   with the larger world x (RAS+: +x is the patient's right).

**Confidence** = plausibility x ``min(1, s / s_ref)``, with s the weaker head's template score and ``s_ref`` that
of a clearly delineated head in that modality (0.5 mri-fat, 0.25 mri-water, 0.15 ct); both factors lie in
[0, 1]. A volume without a pair of plausibility >= 0.2 and score >= the modality's minimum (0.25, 0.1, 0.06)
raises :class:`~landmark_unet.errors.InputError` naming the file (e.g. an upper-abdomen field of view).

Measured (tests/test_detect.py, benchmarks/bench_detect.py, one core): phantom fat channel, 20 subjects, errors
0.29 mm mean / 0.78 mm max at 128 x 128 x 126 (3.75 x 3.75 x 8 mm) and 0.21 / 0.55 mm at the study's 256 x 256 x
252; real CT fixture 3.7 mm (right) and 4.0 mm (left) from the largest inscribed sphere of each femur mask, in
any orientation; 0.9 s for a 256 x 256 x 252 volume (1.1 s from the file). The water channel alone is harder
(its joint space is thin and fat is as water-dark as marrow, so the greater trochanters and ischial tuberosities
look head-like too): 18 of 20 phantom subjects within 3 mm at 256 x 256 x 252, less reliable at 8 mm slices;
prefer the fat channel.

Library: :func:`detect_hips` (array + affine), :func:`detect_hips_file` (a NIfTI file). Command line::

    python -m landmark_unet.landmarks.detect IMAGE.nii.gz --out landmarks.txt [--modality mri-fat|mri-water|ct]

writes ``landmarks.txt`` (DESIGN.md: voxel coordinates of the input file's own grid, line 1 the subject's right
head, line 2 the left, comment lines with the mm centres and the confidence) atomically, and prints the centres.
Bad input: one line ``error: <file>: <problem>`` on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from landmark_unet.data.sources import as_volume
from landmark_unet.errors import InputError, exit_on_input_error

MODALITIES = ("mri-fat", "mri-water", "ct")
PAIR_DISTANCE_MM = (120.0, 220.0)  # femoral-head centre to centre
# ---- candidates
COARSE_MM = 6.0  # target spacing of the candidate search grid (integer block means)
DOG_SIGMAS_MM = (10.0, 12.5, 15.5)  # DoG scales: balls of radius ~18-28 mm
DOG_RATIO = 1.6
PEAK_MM = 12.0  # a candidate is the maximum within +-PEAK_MM
MIN_DEPTH_MM = 20.0  # a head centre lies at least this far inside the body
MAX_CANDIDATES = 400  # DoG maxima kept (strongest first)
# ---- sphere template (see _Refiner), per modality: range of the ball radius rho (the head's bright core: the
# marrow inside the cortex in mri-fat, marrow and cortex in mri-water, the dense core of the head in ct; the head
# radius is 20-26 mm), ring and outer shell thickness (mm)
TEMPLATE_RADII_MM = {"mri-fat": (16.0, 28.0), "mri-water": (18.0, 28.0), "ct": (14.0, 26.0)}
TEMPLATE_MM = {"mri-fat": (4.0, 8.0), "mri-water": (4.0, 8.0), "ct": (4.0, 8.0)}
ZONE_WEIGHTS = (1.0, -2.0, 1.0)  # ball, ring, outer shell
ZONE_MIN_COVER = (0.95, 0.95, 0.6)  # fraction of each zone that must lie inside the volume
# template score of a head (units of b): (minimum to accept, reference for the confidence)
CONTRAST = {"mri-fat": (0.25, 0.5), "mri-water": (0.1, 0.25), "ct": (0.06, 0.15)}
# ---- search
SCREEN_MIN_PLAUSIBILITY = 0.1  # a candidate is screened when it has a partner at least this plausible
MAX_SCREENED = 24  # at most this many candidates (by DoG response x best partner's plausibility)
SCREEN_STEP_MM = {"mri-fat": 3.0, "mri-water": 2.0, "ct": 3.0}
SCREEN_SEARCH_MM = 9.0  # screening window +- (at least 1.5 coarse voxels)
RANK_PAIRS = 4  # best screened pairs re-scored on the fine grid
REFINE_STEP_MM = 2.0
REFINE_SEARCH_MM = 6.0
MIN_PLAUSIBILITY = 0.2
# ---- relative position (see _Geometry)
# The heads flank the pelvis, below the trunk: the body's antero-posterior extent on the midline between them, at
# their height and these heights above (those inside the volume), maps TRUNK_AP_MM[0] -> 0 .. TRUNK_AP_MM[1] -> 1
# (between two knees or thighs it is small); the smallest factor counts.
TRUNK_ABOVE_MM = (0.0, 40.0, 80.0)
TRUNK_AP_MM = (60.0, 150.0)
AP_FRACTION = (0.55, 0.12)  # a head centre's position in the body's AP extent (from the back): mean, sd
# ---- CT
CT_WINDOW_HU = (-100.0, 600.0)
METAL_HU = 1800.0  # above: metal (implants); replaced by METAL_FILL_HU
METAL_FILL_HU = 300.0

_TRACE: list | None = None  # set to a list to record intermediate results (debugging, tests)


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
        if modality == "mri-water":  # fat is water-dark too: close small gaps in the muscle-bright body
            m = ndi.binary_closing(m, iterations=2)
    for k in range(m.shape[2]):
        m[:, :, k] = ndi.binary_fill_holes(m[:, :, k])
    lab, n = ndi.label(m)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == int(np.argmax(sizes))
    return m


def _gauss(a: np.ndarray, sigma_mm: float, csp: np.ndarray) -> np.ndarray:
    return ndi.gaussian_filter(a, sigma=sigma_mm / csp, mode="nearest", truncate=3.0)


# ------------------------------------------------------------------------------------------------- refinement


class _Refiner:
    """Sphere-template matching around a centre, on a local isotropic grid resampled from the canonical array.

    The template of radius rho has three concentric zones: the ball r < rho (the head), the ring
    rho <= r < rho + ring_mm (cortex and joint space) and the outer shell up to rho + ring_mm + outer_mm (the
    socket or the muscles around). Its score at a centre is ``mean(ball) - 2 mean(ring) + mean(outer)``: a
    bright ball inside a dark rim, which is darker than what lies beyond it -- a ball-and-socket joint. The two
    differences ball - ring and outer - ring make the score insensitive to the socket being brighter than the
    head or not, and a ball merged with its socket (no dark rim at rho) scores low, so the centre is not drawn
    into the acetabulum. Means use soft partial-volume weights and leave out voxels outside the volume; the ball
    and the ring must lie (95 %) inside the volume, the outer shell mostly (60 %). :meth:`refine` evaluates every
    grid position within ``search_mm`` of the start (FFT correlation) and locates the best to sub-voxel
    precision, re-centring up to ``passes`` - 1 times while the best lies on the window's edge;
    :meth:`score_at` evaluates one position (direct sums).
    """

    def __init__(self, arr: np.ndarray, spacing: np.ndarray, norm: _Normaliser, step_mm: float, search_mm: float,
                 radii_mm: tuple[float, ...], ring_mm: float, outer_mm: float, min_radius_mm: float = 0.0,
                 passes: int = 2):
        self.arr = arr
        self.sp = spacing
        self.norm = norm
        self.h = float(step_mm)
        self.passes = int(passes)
        self.search = max(1, int(math.ceil(search_mm / self.h)))
        self.radii = tuple(sorted(float(r) for r in radii_mm))
        self.allowed = np.array([r >= min_radius_mm for r in self.radii])
        if not self.allowed.any():
            raise ValueError("no template radius reaches min_radius_mm")
        rmax = max(self.radii) + ring_mm + outer_mm
        self.kr = int(math.ceil(rmax / self.h)) + 1  # kernel half-width (grid steps)
        self.half = self.search + self.kr  # local grid half-width
        n = 2 * self.half + 1
        k = 2 * self.kr + 1
        self.fshape = [sfft.next_fast_len(n + k - 1, real=True)] * 3
        ax = np.arange(-self.kr, self.kr + 1) * self.h
        r = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)

        def inside(radius: float) -> np.ndarray:
            return np.clip((radius - r) / self.h + 0.5, 0.0, 1.0)

        zones = []
        for rho in self.radii:
            ball = inside(rho)
            ring = inside(rho + ring_mm) - ball
            outer = inside(rho + ring_mm + outer_mm) - ball - ring
            zones.append((ball, ring, outer))
        self.zones = np.array(zones, dtype=np.float64)  # (radius, zone, k, k, k)
        self.zone_sums = self.zones.sum(axis=(2, 3, 4))  # (radius, zone)
        self.weights = np.array(ZONE_WEIGHTS)
        self.min_cover = np.array(ZONE_MIN_COVER)
        # combined kernel: score = correlation of b with it (when every voxel lies in the volume);
        # correlation = convolution with the flipped kernel, and these kernels are symmetric
        combined = np.einsum("rzijk,z->rijk", self.zones / self.zone_sums[:, :, None, None, None], self.weights)
        self.combined_spec = [sfft.rfftn(c.astype(np.float32), self.fshape) for c in combined]
        self._zone_spec: list | None = None  # zone kernels, computed when first needed (a volume edge)
        self._cache: dict[tuple, tuple[np.ndarray, float, float]] = {}

    def _correlate(self, spec: np.ndarray, kspec: np.ndarray) -> np.ndarray:
        full = sfft.irfftn(spec * kspec, self.fshape)
        s = self.search
        c = self.half + self.kr  # index of the local-grid centre in the full convolution
        return full[c - s: c + s + 1, c - s: c + s + 1, c - s: c + s + 1]

    def _sample(self, centre: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
        """Head-likeness on the local grid (2 half + 1)^3 around ``centre`` and the in-volume mask."""
        off = (np.arange(2 * half + 1) - half) * self.h
        coords = [centre[a] + off / self.sp[a] for a in range(3)]
        inside = [(c >= -0.5) & (c <= s - 0.5) for c, s in zip(coords, self.arr.shape)]
        grid = np.meshgrid(*coords, indexing="ij")
        vals = ndi.map_coordinates(self.arr, grid, order=1, mode="nearest", prefilter=False)
        valid = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        return self.norm(vals), valid  # float32: single-precision FFTs are about twice as fast

    def score_at(self, centre_vox: np.ndarray) -> tuple[float, float]:
        """Template score (best radius) at one position, and that radius (mm); -1 when outside the volume."""
        b, valid = self._sample(np.asarray(centre_vox, dtype=np.float64), self.kr)
        v = valid.astype(np.float64)
        sums = np.einsum("rzijk,ijk->rz", self.zones, (b * v).astype(np.float64))
        cover = np.einsum("rzijk,ijk->rz", self.zones, v)
        means = sums / np.maximum(cover, 1e-6)
        score = means @ self.weights
        ok = np.all(cover >= self.min_cover * self.zone_sums, axis=1)
        score = np.where(ok, score, -np.inf)
        head = self._head_score(score[:, None])[0]
        if not math.isfinite(head):
            return -1.0, self.radii[0]
        i = int(np.argmax(np.where(self.allowed, score, -np.inf)))
        return float(head), self.radii[i]

    def _head_score(self, S: np.ndarray) -> np.ndarray:
        """Per position (last axes of S, radius first): the best score over head-sized radii, or -inf where a
        smaller ball matches better (a smaller round structure: an ischial tuberosity, a femoral neck)."""
        sa = S[self.allowed].max(axis=0)
        if self.allowed.all():
            return sa
        ss = S[~self.allowed].max(axis=0)
        return np.where(sa >= ss, sa, -np.inf)

    def refine(self, centre_vox: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Best centre (canonical voxel coordinates, sub-voxel), its template score and ball radius (mm)."""
        key = tuple(np.round(np.asarray(centre_vox, dtype=np.float64), 3))
        if key in self._cache:
            return self._cache[key]
        centre = np.asarray(centre_vox, dtype=np.float64)
        for _ in range(self.passes):  # again when the best match lies on the edge of the search window
            pos, score, rho, edge = self._refine_once(centre)
            if not edge:
                break
            centre = pos
        self._cache[key] = (pos, score, rho)
        return pos, score, rho

    def _refine_once(self, centre: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
        b, valid = self._sample(centre, self.half)
        partial = not bool(valid.all())
        spec = sfft.rfftn(b * valid if partial else b, self.fshape)
        if partial:
            if self._zone_spec is None:
                self._zone_spec = [[sfft.rfftn(z.astype(np.float32), self.fshape) for z in zr] for zr in self.zones]
            vspec = sfft.rfftn(valid.astype(np.float32), self.fshape)
        scores = []
        for ri in range(len(self.radii)):
            if partial:
                sc = 0.0
                bad = False
                for zi, zspec in enumerate(self._zone_spec[ri]):
                    nz = self._correlate(vspec, zspec)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        sc = sc + self.weights[zi] * self._correlate(spec, zspec) / np.maximum(nz, 1e-6)
                    bad = bad | (nz < self.min_cover[zi] * self.zone_sums[ri, zi])
                sc = np.where(bad, -np.inf, sc)
            else:
                sc = self._correlate(spec, self.combined_spec[ri])
            scores.append(sc)
        S = np.stack(scores)  # (radius, x, y, z)
        H = self._head_score(S)
        p = np.unravel_index(int(np.argmax(H)), H.shape)
        best = float(H[p])
        if not math.isfinite(best):
            return centre, -1.0, float(self.radii[-1]), False
        ra = np.flatnonzero(self.allowed)
        ri = int(ra[np.argmax(S[ra][:, p[0], p[1], p[2]])])
        sub = np.zeros(3)
        edge = False
        for a in range(3):
            i = p[a]
            if 0 < i < H.shape[a] - 1:
                lo, hi = list(p), list(p)
                lo[a] -= 1
                hi[a] += 1
                fm, fp = float(H[tuple(lo)]), float(H[tuple(hi)])
                den = fm - 2 * best + fp
                if math.isfinite(den) and den < 0:
                    sub[a] = float(np.clip(0.5 * (fm - fp) / den, -0.5, 0.5))
            else:
                edge = True
        rho = self.radii[ri]
        if 0 < ri < len(self.radii) - 1 and self.allowed[ri - 1]:
            fm, f0, fp = (float(S[ri + d, p[0], p[1], p[2]]) for d in (-1, 0, 1))
            den = fm - 2 * f0 + fp
            if math.isfinite(den) and den < 0:
                rho += float(np.clip(0.5 * (fm - fp) / den, -0.5, 0.5)) * (self.radii[ri + 1] - self.radii[ri])
        pos = centre + (np.array(p) + sub - self.search) * self.h / self.sp
        return pos, best, float(rho), edge


class _Geometry:
    """Plausibility of left/right pairs of head centres from the body around them (canonical grid, mm)."""

    def __init__(self, body: np.ndarray, sp: np.ndarray, f: tuple[int, int, int]):
        self.body = body
        self.sp = sp
        self.f = np.asarray(f)
        self.csp = sp * self.f
        xs = (np.arange(body.shape[0]) * f[0] + (f[0] - 1) / 2.0) * sp[0]
        cnt = body.sum(axis=(0, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            self.midline = np.where(cnt > 0, (body.sum(axis=1) * xs[:, None]).sum(axis=0) / cnt, np.nan)
        # antero-posterior extent of the body (mm) at each (x, z) of the coarse grid, and its posterior and
        # anterior ends (coarse y index)
        self.ap = body.sum(axis=1) * self.csp[1]
        any_y = body.any(axis=1)
        self.y_post = np.where(any_y, np.argmax(body, axis=1), -1)
        self.y_ant = np.where(any_y, body.shape[1] - 1 - np.argmax(body[:, ::-1, :], axis=1), -1)

    def _coarse(self, vox: np.ndarray) -> np.ndarray:
        """Canonical voxel coordinates (..., 3) -> nearest coarse indices (clipped into the grid)."""
        c = np.round((np.asarray(vox, dtype=np.float64) - (self.f - 1) / 2.0) / self.f).astype(int)
        return np.clip(c, 0, np.array(self.body.shape) - 1)

    def depth_factor(self, vox: np.ndarray) -> np.ndarray:
        """Factor in [0, 1] for the antero-posterior position of head centres (n, 3): the fraction of the body's
        AP extent (along y through the centre) behind it is about AP_FRACTION[0] (the heads lie mid-depth; the
        ischial tuberosities, for one, lie far back)."""
        ci = self._coarse(vox).reshape(-1, 3)
        y0 = self.y_post[ci[:, 0], ci[:, 2]]
        y1 = self.y_ant[ci[:, 0], ci[:, 2]]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = (ci[:, 1] - y0) / np.maximum(y1 - y0, 1)
        f = np.exp(-0.5 * ((frac - AP_FRACTION[0]) / AP_FRACTION[1]) ** 2)
        return np.where(y0 >= 0, f, 0.0)

    def matrix(self, right: np.ndarray, left: np.ndarray) -> np.ndarray:
        """Plausibility in [0, 1] of heads at canonical voxel positions right[i] (n, 3) and left[j] (m, 3): (n, m).

        Product of: centre distance (1 inside PAIR_DISTANCE_MM, Gaussian sd 10 mm outside, 0 beyond 30 mm); height
        and depth differences (sd 15 mm); offset of the midpoint from the body midline at its height (sd 20 mm);
        a trunk over the pair (TRUNK_ABOVE_MM, TRUNK_AP_MM); each head's depth (:meth:`depth_factor`). 0 when
        right[i] is not to the right of left[j] or the midpoint lies outside the body.
        """
        right = np.asarray(right, dtype=np.float64).reshape(-1, 3)
        left = np.asarray(left, dtype=np.float64).reshape(-1, 3)
        d = (right[:, None, :] - left[None, :, :]) * self.sp
        dist = np.linalg.norm(d, axis=2)
        dmin, dmax = PAIR_DISTANCE_MM
        excess = np.maximum(0.0, np.maximum(dmin - dist, dist - dmax))
        g = np.exp(-0.5 * (excess / 10.0) ** 2) * (excess <= 30.0) * (d[..., 0] > 0)
        g *= np.exp(-0.5 * (d[..., 2] / 15.0) ** 2) * np.exp(-0.5 * (d[..., 1] / 15.0) ** 2)
        mid = (right[:, None, :] + left[None, :, :]) / 2.0
        mi = self._coarse(mid)
        g *= self.body[mi[..., 0], mi[..., 1], mi[..., 2]]
        m = self.midline[mi[..., 2]]
        off = np.where(np.isfinite(m), mid[..., 0] * self.sp[0] - np.nan_to_num(m), 0.0)
        g *= np.exp(-0.5 * (off / 20.0) ** 2)
        trunk = np.ones(g.shape)
        lo, hi = TRUNK_AP_MM
        for above_mm in TRUNK_ABOVE_MM:
            k = mi[..., 2] + int(round(above_mm / self.csp[2]))
            ap = self.ap[mi[..., 0], np.minimum(k, self.body.shape[2] - 1)]
            trunk = np.minimum(trunk, np.where(k < self.body.shape[2], np.clip((ap - lo) / (hi - lo), 0.0, 1.0), 1.0))
        g *= trunk
        g *= self.depth_factor(right)[:, None] * self.depth_factor(left)[None, :]
        return g

    def __call__(self, right: np.ndarray, left: np.ndarray) -> float:
        return float(self.matrix(right, left)[0, 0])


def _candidates(b: np.ndarray, body: np.ndarray, csp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of the multi-scale DoG blob response inside the body: coarse indices (n, 3) and responses."""
    resp = None
    for s in DOG_SIGMAS_MM:
        r = _gauss(b, s, csp) - _gauss(b, s * DOG_RATIO, csp)
        resp = r if resp is None else np.maximum(resp, r)
    deep = ndi.distance_transform_edt(np.pad(body, 1), sampling=csp)[1:-1, 1:-1, 1:-1] >= MIN_DEPTH_MM
    size = tuple(int(max(3, 2 * round(PEAK_MM / c) + 1)) for c in csp)
    peaks = (resp == ndi.maximum_filter(resp, size=size, mode="nearest")) & (resp > 0) & deep & body
    idx = np.argwhere(peaks)
    vals = resp[tuple(idx.T)]
    order = np.argsort(-vals, kind="stable")[:MAX_CANDIDATES]
    return idx[order], vals[order]


# ---------------------------------------------------------------------------------------------------- detector


def _canonical(image: np.ndarray, affine: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``image`` reoriented to the closest canonical (RAS+) orientation, as float32, with its affine."""
    image = as_volume(image, source)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise InputError(source, f"image of type {image.dtype} is not real-valued")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(source, "affine is missing or not invertible")
    # what nibabel.as_closest_canonical does, without building an image (any numeric dtype)
    ornt = nib.orientations.io_orientation(affine)
    arr = nib.orientations.apply_orientation(image, ornt)
    caff = affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    arr = np.array(arr, dtype=np.float32)  # a copy: the caller's array is never modified
    if not np.isfinite(arr).all():
        raise InputError(source, f"{int((~np.isfinite(arr)).sum())} voxel(s) are NaN or Inf")
    return arr, caff


def _no_pair(source: str, why: str) -> InputError:
    return InputError(source, f"no plausible pair of femoral heads found ({why})")


def detect_hips(image: np.ndarray, affine: np.ndarray, modality: str = "mri-fat", source: str = "<array>") -> HipDetection:
    """Find the two femoral-head centres in a 3D image.

    Args:
        image: (X, Y, Z) array in the grid described by ``affine`` (any orientation, anisotropic spacing).
        affine: (4, 4) voxel -> world (mm) affine of ``image``.
        modality: ``mri-fat`` (fat channel of a Dixon MRI: fat-bright marrow), ``mri-water`` (water channel:
            water-dark marrow) or ``ct`` (Hounsfield units).
        source: name used in error messages (the file).

    Returns:
        HipDetection: centres in world mm, voxel coordinates in ``image``'s own grid (row 0 the subject's right
        head, row 1 the left), the confidence in [0, 1] and the number of round candidates.

    Raises:
        InputError: unknown modality, not a 3D numeric volume, a non-invertible affine, NaN/Inf voxels, a "CT"
            without any voxel below -200 HU, or no plausible pair of femoral heads (e.g. the field of view does
            not hold the hips).
    """
    if modality not in MODALITIES:
        raise InputError("modality", f"unknown modality {modality!r} (choose from {', '.join(MODALITIES)})")
    arr, caff = _canonical(image, affine, source)
    if modality == "ct":
        lowest = float(arr.min())
        if lowest > -200.0:
            raise InputError(source, f"does not look like a CT in HU (no voxel below -200 HU, minimum {lowest:g}); "
                                     "use modality mri-fat or mri-water for an MRI")
        # metal (implants) counts as cancellous bone: a screw in a femoral neck is not a head
        np.copyto(arr, np.float32(METAL_FILL_HU), where=arr > METAL_HU)
    sp = np.sqrt((caff[:3, :3] ** 2).sum(axis=0))
    width = float(sp[0] * arr.shape[0])
    if width < PAIR_DISTANCE_MM[0] + 40.0:
        raise _no_pair(source, f"the field of view is only {width:.0f} mm wide")

    # ---- coarse grid, body, head-likeness, round candidates
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
        b *= body  # air is water-dark too
    idx, vals = _candidates(b, body, csp)
    n = len(idx)
    if n < 2:
        raise _no_pair(source, f"{n} round candidate(s)")
    cvox = idx * np.array(f) + (np.array(f) - 1) / 2.0  # block centres, canonical voxel coordinates
    geometry = _Geometry(body, sp, f)

    # ---- candidates of plausible pairs, screened with the sphere template
    G = geometry.matrix(cvox, cvox)
    ok = G >= SCREEN_MIN_PLAUSIBILITY
    if not ok.any():
        raise _no_pair(source, f"{n} round candidates, none in a left/right arrangement")
    members = np.flatnonzero(ok.any(axis=0) | ok.any(axis=1))
    prio = vals * np.maximum(G.max(axis=1), G.max(axis=0))
    members = members[np.argsort(-prio[members], kind="stable")[:MAX_SCREENED]]
    ring_mm, outer_mm = TEMPLATE_MM[modality]
    rlo, rhi = TEMPLATE_RADII_MM[modality]
    # head-sized radii, and smaller ones: a structure that matches a smaller ball better is not a head
    screen = _Refiner(arr, sp, norm, step_mm=SCREEN_STEP_MM[modality],
                      search_mm=max(SCREEN_SEARCH_MM, 1.5 * float(csp.max())),
                      radii_mm=(rlo - 4.0, *np.linspace(rlo, rhi, 4)), ring_mm=ring_mm, outer_mm=outer_mm,
                      min_radius_mm=rlo, passes=1)
    fine = _Refiner(arr, sp, norm, step_mm=REFINE_STEP_MM, search_mm=REFINE_SEARCH_MM,
                    radii_mm=tuple(np.arange(rlo - 6.0, rhi + 1.0, 2.0)), ring_mm=ring_mm, outer_mm=outer_mm,
                    min_radius_mm=rlo, passes=2)
    pos = np.empty((len(members), 3))
    score = np.empty(len(members))
    for k, i in enumerate(members):
        pos[k], score[k], _ = screen.refine(cvox[i])
    score = np.maximum(score, 0.0)
    S = geometry.matrix(pos, pos) * np.outer(score, score)
    if _TRACE is not None:
        _TRACE.append({"canonical_affine": caff, "candidates": cvox, "dog": vals, "members": members,
                       "screened": pos, "screen_score": score, "pair_scores": S})
    ranked = [(pos[o // len(members)], pos[o % len(members)])
              for o in np.argsort(-S, axis=None, kind="stable")[:RANK_PAIRS] if S.flat[o] > 0]
    if not ranked:
        raise _no_pair(source, f"{n} round candidates, none with a head-like partner")

    # ---- the best few pairs re-scored on the fine grid; the best one refined
    best = None
    for pr, pl in ranked:
        s_r, _ = fine.score_at(pr)
        s_l, _ = fine.score_at(pl)
        value = max(s_r, 0.0) * max(s_l, 0.0) * geometry(pr, pl)
        if _TRACE is not None:
            _TRACE.append({"ranked": (pr, pl), "score": (s_r, s_l), "value": value})
        if best is None or value > best[0]:
            best = (value, pr, pl)
    assert best is not None
    pr, s_r, _ = fine.refine(best[1])
    pl, s_l, _ = fine.refine(best[2])
    if pr[0] < pl[0]:  # canonical +x is the subject's right
        pr, pl, s_r, s_l = pl, pr, s_l, s_r
    g = geometry(pr, pl)
    s_min = min(s_r, s_l)
    c_min, c_ref = CONTRAST[modality]
    if g < MIN_PLAUSIBILITY or s_min < c_min:
        raise _no_pair(source, f"{n} round candidates; best pair: plausibility {g:.2f}, template score {s_min:.2f}")
    confidence = float(np.clip(g * min(1.0, s_min / c_ref), 0.0, 1.0))
    world = (np.c_[np.stack([pr, pl]), np.ones(2)] @ caff.T)[:, :3]
    vox = (np.c_[world, np.ones(2)] @ np.linalg.inv(np.asarray(affine, dtype=np.float64)).T)[:, :3]
    return HipDetection(right_mm=world[0], left_mm=world[1], voxels=vox, confidence=confidence, candidates=n)


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
        description="Detect the two hip joints (femoral-head centres) in a 3D image and write landmarks.txt: voxel "
                    "coordinates x y z of the input grid, line 1 the subject's right head, line 2 the left.")
    parser.add_argument("image", help="3D NIfTI image (.nii or .nii.gz), any orientation")
    parser.add_argument("--out", required=True, help="landmarks.txt to write (atomically)")
    parser.add_argument("--modality", choices=MODALITIES, default="mri-fat",
                        help="image contrast: mri-fat (Dixon fat channel, default), mri-water (water channel), "
                             "ct (Hounsfield units)")
    args = parser.parse_args(argv)
    with exit_on_input_error():
        det = detect_hips_file(args.image, modality=args.modality)
        r, l_ = det.right_mm, det.left_mm
        comment = (f"hip joints (femoral-head centres) detected in {Path(args.image).name} "
                   f"by landmark_unet.landmarks.detect, modality {args.modality}\n"
                   f"world RAS mm: right {r[0]:.1f} {r[1]:.1f} {r[2]:.1f}, left {l_[0]:.1f} {l_[1]:.1f} {l_[2]:.1f}; "
                   f"confidence {det.confidence:.2f}\n"
                   "voxel coordinates x y z of the input grid: line 1 right, line 2 left")
        try:
            write_landmarks(args.out, det.voxels, comment)
        except OSError as err:
            raise InputError(args.out, f"cannot write ({err.strerror or err.__class__.__name__})") from None
        print(f"right femoral head: {r[0]:8.1f} {r[1]:8.1f} {r[2]:8.1f} mm (world RAS)")
        print(f"left femoral head:  {l_[0]:8.1f} {l_[1]:8.1f} {l_[2]:8.1f} mm (world RAS)")
        print(f"confidence: {det.confidence:.2f}  ({det.candidates} round candidates)")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
