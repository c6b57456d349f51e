"""Synthetic whole-body two-channel Dixon MRI phantom (fat + water) with organ masks and hip landmarks.

The phantom stands in for the study's 50 whole-body scans (256 x 256 x 252 voxels, neck to knees) so that the
whole pipeline can be built, tested and benchmarked without real data. It is meant to be *hard enough that a
segmentation result means something*:

* **Anatomy in millimetres, tied to the hips.** Every subject is built in a body frame whose origin is the
  midpoint of the two femoral-head centres (x to the patient's right, y anterior, z superior, RAS+). Organ
  positions are the offsets of DESIGN.md's anatomy table, scaled by a per-subject height factor (normal, sd 6 %,
  clipped to +-15 %), plus a few mm of independent jitter; the body girth varies likewise (+-15 %), the organ
  sizes about +-20 %. The body is then shifted along z uniformly by up to +-140 mm and a little in-plane, so
  the hips (and every organ with them) sit at a different slice in every subject; the organ heights correlate
  with the hips' height at r ~ 0.95. The grid only samples this geometry: the same subject at 64^3 or 256^3
  is the same body, just coarser.
* **A body, not a set of blobs.** Skin/subcutaneous fat, a muscle wall, an abdominal cavity of visceral fat, a
  thorax with dark lungs above a domed diaphragm, a mediastinum and a heart, a neck, two upper legs that part
  below the groin, a spine of vertebral bodies and discs with a canal and spinous processes, psoas muscles,
  ribs, a pelvic ring (iliac wings, acetabula, pubic and ischial rami, sacrum), femoral heads (spheres of radius
  20-26 mm centred on the landmarks) continuing as necks, trochanters and shafts. Bone is fat-bright marrow
  inside a dark cortical rim.
* **Organs that are recognised by position and shape, not intensity.** Liver (a wedge tapering to the left,
  flattened under the diaphragm and against the abdominal wall), spleen (a crescent, left posterior), kidneys
  (beans with a hilum notch, in perirenal fat beside the spine), pancreas (a curved tube crossing the midline,
  tail towards the spleen), bladder (30-600 ml, log-uniform; absent with ``bladder_absent_prob``). All are smooth
  randomly deformed implicit shapes. Liver and spleen share their signal range (the liver fat fraction varies
  between subjects); kidneys are slightly brighter in water; the pancreas signal is that of the duodenum, small
  bowel loops and the large vessels (aorta, IVC, portal and splenic veins) around it. A stomach, colon and
  gallbladder complete the abdomen. Organ masks never overlap (higher-priority organs carve the others, with a
  thin fat gap), unless ``annotation_defects`` makes the liver mask -- not the image -- spill over the upper pole
  of the right kidney like the study's Figure 11.
* **Imaging effects.** Soft partial-volume edges (a ~1 voxel occupancy ramp from each shape's signed distance),
  a mild smooth 3D tissue texture, a smooth multiplicative bias field (coil profile plus station ripple along
  z) and Rician noise (magnitude of complex Gaussian noise, also in the background; the Gaussian draws are
  16-bit quantised normal quantiles, ~3x faster than ``standard_normal``).

Geometry summary (body frame, mm, before the height factor), and where it departs from DESIGN.md's table:

* femoral heads at x = +-(80..100), radius 20-26;
* bladder on the pelvic floor (bottom at -10..+10), centre +10..+60 depending on its volume, anterior, trimmed
  by the pelvic walls (lower than the table's +30..+80: in the real CT fixture a 480 ml bladder is centred
  22 mm above the hips);
* kidneys +200..+285, x = +-(55..70) (more lateral than the table's 45-65 so that they clear the vertebral
  bodies and psoas; the real CT fixture has them at +-71..77), level with the vertebral bodies, left 5-20 higher;
* pancreas +250..+300, head right of the midline, tail rising towards the splenic hilum;
* spleen +310..+380, x = -(75..100), posterior;
* liver dome +435..+465, centre x = +40..+65, 135-175 mm from the dome to the inferior border of the right lobe
  (the table's 120-160 gave livers under 1200 ml once the diaphragm and the abdominal wall had shaped them).

Resulting mask volumes over 40 subjects: liver 1130-2260 ml (mean ~1540), kidneys 245-345 ml (both), pancreas
45-96 ml, spleen 105-222 ml, bladder 30-650 ml. No arms (the FOV is 480 mm wide).

``generate_subject`` is deterministic in ``(seed, index)`` alone (``np.random.SeedSequence([seed, index])``): a
subject does not depend on how many others are made, nor on the order or the process that makes it. The
anatomy parameters come from one child stream (independent of the grid), texture, bias and noise from another.

Files (``write_subject``; DESIGN.md "Folder layout"): ``fat.nii.gz`` and ``water.nii.gz`` (int16, fat-bright
tissue about 1000), ``masks/<organ>.nii.gz`` (uint8 0/1) and ``landmarks.txt`` (line 1 the right femoral-head
centre, line 2 the left, voxel coordinates of the file grid), written into a temporary sibling folder that is
renamed into place. ``generate_dataset`` writes ``sub000``, ``sub001``, ... and ``phantom.json`` last.

Command line (Hydra, ``conf/phantom.yaml``)::

    python -m landmark_unet.data.phantom out_dir=data/phantom n_subjects=50 seed=0 workers=2
    python -m landmark_unet.data.phantom out_dir=/tmp/tiny n_subjects=4 shape=[96,96,80]
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from landmark_unet.data.nifti import atomic_write_bytes, save_nifti
from landmark_unet.data.organs import ORGANS
from landmark_unet.errors import InputError, exit_on_input_error, run_hydra_main
from landmark_unet.landmarks.io import write_landmarks

PHANTOM_VERSION = "landmark_unet.phantom/1"
INTENSITY_SCALE = 1000.0  # stored value of fat-bright tissue (subcutaneous fat) in fat.nii.gz
F32 = np.float32
_BIG = F32(1.0e4)  # "far outside" signed distance (mm)
_TMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------------------------- configuration


def _triplet(key: str, value: object, kind: type) -> tuple:
    try:
        items = list(value)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(key, f"expected a list of 3 numbers [x, y, z], got {value!r}") from None
    if len(items) != 3:
        raise InputError(key, f"expected 3 entries [x, y, z], got {len(items)}: {items}")
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise InputError(key, f"expected numbers, got {items}")
        if kind is int and float(v) != int(v):
            raise InputError(key, f"expected whole numbers, got {items}")
        if not math.isfinite(float(v)) or v <= 0:
            raise InputError(key, f"every entry must be positive, got {items}")
        out.append(kind(v))
    return tuple(out)


@dataclass(frozen=True)
class PhantomConfig:
    """What every phantom subject shares. Geometry is in mm; the grid only samples it.

    Args:
        shape: voxels [x, y, z] (RAS+: x to the patient's right, y anterior, z superior).
        fov_mm: field of view [x, y, z] in mm; spacing = fov_mm / shape. z covers neck to knees.
        bladder_absent_prob: probability that a subject has no bladder (empty mask, none in the image).
        annotation_defects: make the liver *mask* spill over the right kidney's upper pole (study Figure 11).
        noise: Rician noise level (std of each complex component) relative to the fat-bright signal.
        bias: amplitude of the smooth multiplicative bias field (log-domain, about +-bias).
        texture: amplitude (std, log-domain) of the smooth 3D tissue texture.
        hip_z_mm: height of the hip-joint midpoint above the bottom of the FOV before the random shift.
        z_shift_mm: the subject is shifted along z uniformly in +-z_shift_mm.
        xy_shift_mm: and in-plane uniformly in +-xy_shift_mm (less if the body would leave the FOV).
    """

    shape: tuple[int, int, int] = (256, 256, 252)
    fov_mm: tuple[float, float, float] = (480.0, 480.0, 1008.0)
    bladder_absent_prob: float = 0.1
    annotation_defects: bool = False
    noise: float = 0.03
    bias: float = 0.25
    texture: float = 0.05
    hip_z_mm: float = 310.0
    z_shift_mm: float = 140.0
    xy_shift_mm: float = 12.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _triplet("shape", self.shape, int))
        object.__setattr__(self, "fov_mm", _triplet("fov_mm", self.fov_mm, float))
        for key in ("bladder_absent_prob", "noise", "bias", "texture", "hip_z_mm", "z_shift_mm", "xy_shift_mm"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise InputError(key, f"expected a number, got {value!r}")
            if not math.isfinite(float(value)) or value < 0:
                raise InputError(key, f"must be a finite number >= 0, got {value}")
            object.__setattr__(self, key, float(value))
        if self.bladder_absent_prob > 1:
            raise InputError("bladder_absent_prob", f"must lie in [0, 1], got {self.bladder_absent_prob}")
        if not isinstance(self.annotation_defects, (bool, np.bool_)):
            raise InputError("annotation_defects", f"expected true or false, got {self.annotation_defects!r}")
        object.__setattr__(self, "annotation_defects", bool(self.annotation_defects))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, [x, y, z]."""
        return tuple(f / s for f, s in zip(self.fov_mm, self.shape))  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> world (mm, RAS+) affine; the FOV centre is the world origin."""
        aff = np.eye(4)
        sp = np.asarray(self.spacing)
        aff[:3, :3] = np.diag(sp)
        aff[:3, 3] = -np.asarray(self.fov_mm) / 2 + sp / 2
        return aff

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["fov_mm"] = list(self.fov_mm)
        return d


@dataclass
class PhantomSubject:
    """One phantom subject. Arrays are indexed [x, y, z] (RAS+), float32 images in units of fat-bright signal.

    Attributes:
        fat, water: (X, Y, Z) float32, subcutaneous fat about 1.0 in ``fat``.
        masks: organ -> (X, Y, Z) uint8 0/1, for every organ of ``ORGANS`` (an absent bladder is all zeros).
        landmarks: (2, 3) float64 voxel coordinates; row 0 the subject's right femoral-head centre, row 1 the left.
        affine: (4, 4) voxel -> world (mm, RAS+).
        params: the sampled subject parameters (json-serialisable), with the organ volumes in ml.
    """

    fat: np.ndarray
    water: np.ndarray
    masks: dict[str, np.ndarray]
    landmarks: np.ndarray
    affine: np.ndarray
    params: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ grid + shapes


class _Box:
    """A sub-block [z0:z1, y0:y1, x0:x1] of the grid with its body-frame coordinates (broadcastable, float32)."""

    __slots__ = ("lo", "hi", "sl", "Z", "Y", "X", "shape")

    def __init__(self, grid: _Grid, lo: tuple[int, int, int], hi: tuple[int, int, int]):
        self.lo, self.hi = lo, hi  # (z, y, x) index bounds
        self.sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        self.Z = grid.z[lo[0]:hi[0], None, None]
        self.Y = grid.y[None, lo[1]:hi[1], None]
        self.X = grid.x[None, None, lo[2]:hi[2]]
        self.shape = (hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2])

    def intersect(self, other: _Box) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """(slices into self's arrays, slices into other's arrays) of the common block, or None."""
        lo = [max(a, b) for a, b in zip(self.lo, other.lo)]
        hi = [min(a, b) for a, b in zip(self.hi, other.hi)]
        if any(b <= a for a, b in zip(lo, hi)):
            return None
        mine = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, self.lo))
        theirs = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, other.lo))
        return mine, theirs


class _Grid:
    """Voxel-centre coordinates of the output grid in the body frame (mm), arrays stored [z, y, x]."""

    def __init__(self, cfg: PhantomConfig, origin_fov: np.ndarray):
        self.shape = cfg.shape
        self.sp = np.asarray(cfg.spacing)
        self.origin = np.asarray(origin_fov, dtype=np.float64)  # body-frame origin in FOV mm (x, y, z)
        coords = [((np.arange(n) + 0.5) * s - o).astype(F32) for n, s, o in zip(cfg.shape, self.sp, self.origin)]
        self.x, self.y, self.z = coords
        self.w = float(np.prod(self.sp) ** (1 / 3))  # partial-volume ramp width (mm)
        self.wz = float(self.sp[2])

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> _Box | None:
        """Voxels whose centres lie in the body-frame mm box [lo, hi] (x, y, z), or None if there are none."""
        idx_lo, idx_hi = [], []
        for c, a, b in zip((self.z, self.y, self.x), lo[::-1], hi[::-1]):
            i0 = int(np.searchsorted(c, a, "left"))
            i1 = int(np.searchsorted(c, b, "right"))
            if i1 <= i0:
                return None
            idx_lo.append(i0)
            idx_hi.append(i1)
        return _Box(self, tuple(idx_lo), tuple(idx_hi))

    def to_voxel(self, p: Sequence[float]) -> np.ndarray:
        """Body-frame mm (x, y, z) -> voxel coordinates (x, y, z) of the file grid."""
        return (np.asarray(p, dtype=np.float64) + self.origin) / self.sp - 0.5


def _occ(d: np.ndarray, w: float) -> np.ndarray:
    """Soft occupancy of a signed distance map (mm, < 0 inside): 1 inside, 0 outside, linear ramp of width w."""
    o = np.multiply(d, F32(-1.0 / w), dtype=F32)
    o += F32(0.5)
    np.clip(o, 0.0, 1.0, out=o)
    return o


def _blend(view: np.ndarray, occ: np.ndarray, value) -> None:
    """In place: view <- view + occ * (value - view)  (soft painting of a tissue over what is there)."""
    tmp = np.subtract(value, view, dtype=F32)
    tmp *= occ
    view += tmp


def _rot(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix (degrees, applied x then y then z); its rows are the local axes in body coordinates."""
    a, b, c = np.radians([rx, ry, rz])
    Rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    Ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    Rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (Rz @ Ry @ Rx).T  # rows = rotated unit axes


class _Blob:
    """A smooth deformed (super)ellipsoid, evaluated as an approximate signed distance (mm).

    Local coordinates ``(p, q, s) = R (x - c) / semi``; then optional bending (``s -= bend_s * p**2``,
    ``q -= bend_q * p**2``, ``p += bend_p * s**2``), tapering of q and s towards p = -1 (``taper``) with a shift of
    their centre (``shift_q``, ``shift_s``), a normalised radius of exponent ``e``, a low-frequency random
    modulation of the radius (``waves``: rows kp, kq, ks, phase, amplitude) and an optional notch (a second
    ellipsoid in local normalised coordinates, subtracted).
    """

    def __init__(self, centre, semi, R=None, e=2.0, taper=0.0, shift_q=0.0, shift_s=0.0, bend_s=0.0, bend_q=0.0,
                 bend_p=0.0, waves=None, notch=None, cut=None):
        self.c = np.asarray(centre, dtype=np.float64)
        self.semi = np.asarray(semi, dtype=np.float64)
        self.R = np.eye(3) if R is None else np.asarray(R, dtype=np.float64)
        self.e, self.taper, self.shift_q, self.shift_s = e, taper, shift_q, shift_s
        self.bend_s, self.bend_q, self.bend_p = bend_s, bend_q, bend_p
        self.waves = None if waves is None else np.asarray(waves, dtype=np.float64)
        self.notch = notch  # (centre (3,), semi (3,)) in local normalised units
        self.cut = cut  # optional callable(box, d) -> d, extra carving in body coordinates
        self.rc = 3.0 / float(np.sum(1.0 / self.semi))  # characteristic radius: mm per unit of normalised radius
        # bounding box: local half-extents (with the deformations), projected on the body axes
        slack = 1.06 + (float(np.sum(np.abs(self.waves[:, 4]))) * 1.2 if self.waves is not None else 0.0)
        ext = self.semi * slack
        ext = ext + self.semi * np.array([abs(bend_p), abs(shift_q) + abs(bend_q), abs(shift_s) + abs(bend_s)])
        half = np.abs(self.R).T @ ext + 4.0
        self.lo, self.hi = self.c - half, self.c + half

    def sdf(self, box: _Box) -> np.ndarray:
        dx, dy, dz = box.X - F32(self.c[0]), box.Y - F32(self.c[1]), box.Z - F32(self.c[2])
        loc = []
        for row, s in zip(self.R, self.semi):
            r = (row / s).astype(F32)
            v = dx * r[0] + dy * r[1]
            v = v + dz * r[2]
            loc.append(v)
        p, q, s = loc
        if self.bend_s:
            s = s - F32(self.bend_s) * p * p
        if self.bend_q:
            q = q - F32(self.bend_q) * p * p
        if self.bend_p:
            p = p + F32(self.bend_p) * s * s
        if self.taper or self.shift_q or self.shift_s:
            u = (F32(1.0) - np.clip(p, -1.0, 1.0)) * F32(0.5)  # 0 at the right/thick end, 1 at the tip
            if self.shift_q:
                q = q - F32(self.shift_q) * u
            if self.shift_s:
                s = s - F32(self.shift_s) * u
            if self.taper:
                g = F32(1.0) / (F32(1.0) - F32(self.taper) * u)
                q = q * g
                s = s * g
        if self.e == 2.0:
            r = np.sqrt(p * p + q * q + s * s)
        elif self.e == 3.0:
            p, q, s = np.abs(p), np.abs(q), np.abs(s)
            r = np.cbrt(p * p * p + q * q * q + s * s * s)
        else:
            e = F32(self.e)
            r = (np.abs(p) ** e + np.abs(q) ** e + np.abs(s) ** e) ** F32(1.0 / self.e)
        if self.waves is not None:
            mod = np.ones_like(r)
            for kp, kq, ks, ph, amp in self.waves:
                arg = p * F32(kp) + q * F32(kq)
                arg = arg + s * F32(ks)
                arg += F32(ph)
                mod += F32(amp) * np.cos(arg)
            r = r / mod
        d = (r - F32(1.0)) * F32(self.rc)
        if self.notch is not None:
            nc, ns = self.notch
            rn = np.sqrt(((p - F32(nc[0])) / F32(ns[0])) ** 2 + ((q - F32(nc[1])) / F32(ns[1])) ** 2
                         + ((s - F32(nc[2])) / F32(ns[2])) ** 2)
            dn = (rn - F32(1.0)) * F32(self.rc * float(np.min(ns)))
            d = np.maximum(d, -dn)
        if self.cut is not None:
            d = self.cut(box, d)
        return d.astype(F32, copy=False)


class _Tube:
    """A tube of varying radius along a polyline (union of cone-capsules), signed distance in mm."""

    def __init__(self, points, radii, cut=None):
        self.p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        r = np.asarray(radii, dtype=np.float64)
        self.r = np.broadcast_to(r, (len(self.p),)).copy()
        self.cut = cut
        pad = float(self.r.max()) + 6.0
        self.lo, self.hi = self.p.min(0) - pad, self.p.max(0) + pad

    def field(self, grid: _Grid) -> tuple[_Box, np.ndarray] | None:
        box = grid.box(self.lo, self.hi)
        if box is None:
            return None
        d = np.full(box.shape, _BIG, dtype=F32)
        for a, b, ra, rb in zip(self.p[:-1], self.p[1:], self.r[:-1], self.r[1:]):
            pad = max(ra, rb) + 4.0
            sub = grid.box(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
            if sub is None:
                continue
            hit = box.intersect(sub)
            if hit is None:
                continue
            mine, theirs = hit
            D = (b - a).astype(np.float64)
            L2 = max(float(D @ D), 1e-6)
            ax, ay, az = sub.X - F32(a[0]), sub.Y - F32(a[1]), sub.Z - F32(a[2])
            t = ax * F32(D[0] / L2) + ay * F32(D[1] / L2)
            t = t + az * F32(D[2] / L2)
            np.clip(t, 0.0, 1.0, out=t)
            ex = ax - t * F32(D[0])
            ey = ay - t * F32(D[1])
            ez = az - t * F32(D[2])
            dist = np.sqrt(ex * ex + ey * ey + ez * ez)
            dist -= F32(ra) + t * F32(rb - ra)
            np.minimum(d[mine], dist[theirs], out=d[mine])
        if self.cut is not None:
            d = self.cut(box, d)
        return box, d


def _blob_field(grid: _Grid, blob: _Blob) -> tuple[_Box, np.ndarray] | None:
    box = grid.box(blob.lo, blob.hi)
    if box is None:
        return None
    return box, blob.sdf(box)


def _smooth_path(ctrl: np.ndarray, n: int) -> np.ndarray:
    """Catmull-Rom spline through control points (k, 3), sampled at n points."""
    ctrl = np.asarray(ctrl, dtype=np.float64)
    ext = np.vstack([2 * ctrl[0] - ctrl[1], ctrl, 2 * ctrl[-1] - ctrl[-2]])
    seg = len(ctrl) - 1
    out = []
    for tt in np.linspace(0, seg, n):
        i = min(int(tt), seg - 1)
        t = tt - i
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t * t
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    return np.asarray(out)


# --------------------------------------------------------------------------------------------------- the body

# Torso profile. Rows: z (mm above the hips, times the height factor), lean (muscle + bone) half-width and
# half-depth as fractions of 152 mm and 100 mm (times the girth factor), AP centre (mm), subcutaneous-fat factor,
# extra lateral room the skeleton needs at the hips (added to the hip half-distance; NaN = none).
_TORSO = np.array([
    # z     A     B     cy    fat   hip-room
    [-95, 0.78, 0.72, -12, 1.10, 40],
    [-45, 0.93, 0.88, -10, 1.25, 70],
    [0, 0.98, 0.95, -8, 1.30, 72],
    [60, 0.97, 0.95, -4, 1.25, 60],
    [130, 0.93, 0.95, 0, 1.10, np.nan],
    [200, 0.94, 1.00, 0, 1.00, np.nan],
    [280, 0.98, 1.02, 0, 0.95, np.nan],
    [360, 1.02, 1.05, 0, 0.90, np.nan],
    [440, 1.04, 1.08, 0, 0.85, np.nan],
    [520, 1.05, 1.08, 0, 0.75, np.nan],
    [600, 1.08, 1.05, 0, 0.65, np.nan],
    [645, 1.10, 0.92, 0, 0.60, np.nan],
    [672, 0.55, 0.68, -18, 0.45, np.nan],
    [700, 0.36, 0.55, -22, 0.35, np.nan],
    [770, 0.34, 0.55, -22, 0.30, np.nan],
    [800, 0.42, 0.80, -5, 0.25, np.nan],
    [880, 0.47, 0.92, 5, 0.25, np.nan],
    [950, 0.40, 0.80, 5, 0.25, np.nan],
    [995, 0.12, 0.25, 5, 0.20, np.nan],
])
_TORSO_TOP = 1000.0
_CROTCH = -95.0
# Legs: z, lean half-width, half-depth (mm, times girth), centre x offset from the hip half-distance, centre y, fat.
_LEGS = np.array([
    [-30, 74, 80, -8, -4, 1.20],
    [-120, 74, 78, -6, 0, 1.10],
    [-250, 66, 70, -10, 5, 0.95],
    [-400, 55, 58, -15, 5, 0.80],
    [-560, 47, 50, -18, 0, 0.70],
])
_LEGS_TOP = -30.0
# Spine: z, distance from the back's lean surface to the vertebral-body centre (mm, times girth),
# vertebral-body half-width and half-depth (mm), vertebra period (mm, times height), disc fraction.
_SPINE = np.array([
    [0, 38, 30, 14, 36, 0.25],
    [60, 50, 28, 16, 36, 0.25],
    [100, 58, 25, 17, 36, 0.25],
    [200, 70, 24, 17, 35, 0.25],
    [300, 68, 22, 16, 27, 0.20],
    [420, 62, 20, 14, 25, 0.20],
    [560, 58, 17, 13, 24, 0.20],
    [650, 50, 14, 11, 19, 0.22],
    [690, 42, 11, 8, 17, 0.22],
    [790, 42, 10, 8, 17, 0.22],
])
_SPINE_LO, _SPINE_HI = 95.0, 790.0
# Cavity: z, lateral limit in the pelvis (mm), posterior edge relative to the vertebral body centre (mm, + =
# behind it), extra wall thickness (ribs) at the sides and front.
_CAVITY = np.array([
    [-35, 28, -16, 0],
    [-10, 44, -16, 0],
    [20, 50, -16, 0],
    [50, 62, -15, 0],
    [90, 92, -8, 0],
    [130, 140, 0, 0],
    [170, 999, 5, 0],
    [250, 999, 5, 2],
    [380, 999, 6, 9],
    [470, 999, 28, 10],
    [630, 999, 28, 10],
])
_CAVITY_LO, _CAVITY_HI = -35.0, 630.0
_CAV_P = 3.0  # superellipse exponent of the cavity cross-section (cavity_sdf assumes 3)


class _Body:
    """Per-subject body profiles (functions of z in the body frame) and the diaphragm."""

    def __init__(self, a: dict):
        self.a = a
        H, S = a["height_factor"], a["size_factor"]
        hh = a["hip_half_mm"]
        self.H, self.S, self.hh = H, S, hh
        t = _TORSO
        self.tz = t[:, 0] * H
        A = t[:, 1] * 152.0 * S
        room = hh + t[:, 5]
        self.tA = np.where(np.isnan(room), A, np.maximum(A, np.nan_to_num(room)))
        self.tB = t[:, 2] * 100.0 * S
        self.tcy = t[:, 3] * S
        self.tfat = t[:, 4] * a["subcutaneous_fat_mm"]
        L = _LEGS
        self.lz = L[:, 0] * H
        self.la, self.lb = L[:, 1] * S, L[:, 2] * S
        self.lcx, self.lcy = hh + L[:, 3], L[:, 4]
        self.lfat = L[:, 5] * a["subcutaneous_fat_mm"]
        sp = _SPINE
        self.sz = sp[:, 0] * H
        self.sdsp, self.shw, self.shd = sp[:, 1] * S, sp[:, 2], sp[:, 3]
        # vertebra phase: integral of dz / period
        zz = np.linspace(_SPINE_LO * H - 10, _SPINE_HI * H + 10, 800)
        per = np.interp(zz, self.sz, sp[:, 4] * H)
        ph = np.concatenate([[0.0], np.cumsum(np.diff(zz) / (0.5 * (per[1:] + per[:-1])))])
        self._phase_z, self._phase = zz, ph + a["spine_phase"]
        self.sdisc = sp[:, 5]
        c = _CAVITY
        self.cz = c[:, 0] * H
        self.c_lim, self.c_back, self.c_rib = c[:, 1] * (0.85 + 0.15 * S), c[:, 2], c[:, 3]
        self.tm = a["muscle_wall_mm"]

    # torso ----------------------------------------------------------------------------------------------
    def torso(self, z):
        return (np.interp(z, self.tz, self.tA), np.interp(z, self.tz, self.tB), np.interp(z, self.tz, self.tcy),
                np.interp(z, self.tz, self.tfat))

    def legs(self, z):
        return (np.interp(z, self.lz[::-1], self.la[::-1]), np.interp(z, self.lz[::-1], self.lb[::-1]),
                np.interp(z, self.lz[::-1], self.lcx[::-1]), np.interp(z, self.lz[::-1], self.lcy[::-1]),
                np.interp(z, self.lz[::-1], self.lfat[::-1]))

    def spine(self, z):
        """Vertebral body centre y, half-width, half-depth, disc fraction and phase at z."""
        A, B, cy, _ = self.torso(z)
        ysp = cy - B + np.interp(z, self.sz, self.sdsp)
        return (ysp, np.interp(z, self.sz, self.shw), np.interp(z, self.sz, self.shd),
                np.interp(z, self.sz, self.sdisc), np.interp(z, self._phase_z, self._phase))

    def cavity(self, z):
        """Cavity half-width, front and back edges (y) at z."""
        A, B, cy, _ = self.torso(z)
        ysp = self.spine(z)[0]
        rib = np.interp(z, self.cz, self.c_rib)
        Ac = np.minimum(A - self.tm - rib, np.interp(z, self.cz, self.c_lim))
        yf = cy + B - self.tm - 0.6 * rib
        yb = ysp - np.interp(z, self.cz, self.c_back)
        return Ac, yf, yb

    def cavity_sdf(self, box: _Box, inset: float = 0.0) -> np.ndarray:
        """Approximate signed distance (mm) to the abdominal/thoracic cavity wall, over a box."""
        z = box.Z.ravel().astype(np.float64)
        Ac, yf, yb = self.cavity(z)
        Ac = np.maximum(Ac - inset, 1.0)
        yc = 0.5 * (yf + yb)
        Bc = np.maximum(0.5 * (yf - yb) - inset, 1.0)
        ux = np.abs(box.X / Ac[:, None, None].astype(F32))
        uy = np.abs((box.Y - yc[:, None, None].astype(F32)) / Bc[:, None, None].astype(F32))
        s = ux * ux * ux + uy * uy * uy  # _CAV_P = 3
        rc = np.sqrt(Ac * Bc)[:, None, None].astype(F32)
        d = (np.cbrt(s) - F32(1.0)) * rc
        lo, hi = _CAVITY_LO * self.H, _CAVITY_HI * self.H
        dz = np.maximum(lo - box.Z, box.Z - hi)
        return np.maximum(d, dz)

    def diaphragm(self, grid: _Grid) -> np.ndarray:
        """Height (body z, mm) of the diaphragm's upper surface over the (y, x) plane, float32 (Y, X)."""
        a = self.a
        x = grid.x[None, :].astype(np.float64)
        y = grid.y[:, None].astype(np.float64)
        yc = a["diaphragm_y_mm"]
        right = a["dome_z_mm"] - a["diaphragm_curv"] * ((x - a["dome_x_mm"]) ** 2 + 0.5 * (y - yc) ** 2)
        left = a["dome_left_z_mm"] - a["diaphragm_curv"] * ((x + a["dome_x_mm"]) ** 2 + 0.5 * (y - yc) ** 2)
        back = 0.008 * np.maximum(yc - 25.0 - y, 0.0) ** 2
        zd = np.maximum(right, left) - back
        return np.maximum(zd, a["dome_z_mm"] - 150.0).astype(F32)


# --------------------------------------------------------------------------------------------------- sampling


def _sample_anatomy(rng: np.random.Generator, cfg: PhantomConfig) -> dict:
    """Draw one subject's anatomy (body frame, mm). Independent of the grid."""

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    def n(sd: float) -> float:
        return float(rng.normal(0.0, sd))

    a: dict = {}
    # height and girth: roughly normal (sd 6 %), clipped to +-15 %; girth partly follows height
    H = float(np.clip(1.0 + rng.normal(0.0, 0.06), 0.85, 1.15))
    S = float(np.clip(1.0 + 0.4 * (H - 1.0) + rng.normal(0.0, 0.055), 0.85, 1.15))
    a["height_factor"], a["size_factor"] = H, S
    a["subcutaneous_fat_mm"] = u(6.0, 30.0)
    a["muscle_wall_mm"] = u(9.0, 15.0)
    a["spine_phase"] = u(0.0, 1.0)
    a["spine_sway_mm"] = [n(3.0), u(200.0, 500.0), u(0, 2 * math.pi)]
    hh = u(80.0, 100.0)
    a["hip_half_mm"] = hh
    r_head = u(20.0, 26.0)
    tilt_y, tilt_z = n(2.0), n(2.5)
    a["hips_mm"] = [[hh, tilt_y, tilt_z], [-hh, -tilt_y, -tilt_z]]  # right, left; midpoint = origin
    a["head_radius_mm"] = [r_head, float(np.clip(r_head + n(0.6), 20.0, 26.0))]
    body = _Body(a)
    Sx = 0.5 + 0.5 * S

    def ysp(z: float) -> float:
        return float(body.spine(z)[0])

    def cav(z: float) -> tuple[float, float, float]:
        Ac, yf, yb = body.cavity(z)
        return float(Ac), float(yf), float(yb)

    # diaphragm and liver ----------------------------------------------------------------------------------
    dome = H * u(435.0, 465.0) + n(4.0)
    _, yf_d, yb_d = cav(dome - 60)
    a["dome_z_mm"] = dome
    a["dome_left_z_mm"] = dome - u(10.0, 30.0)
    a["dome_x_mm"] = u(55.0, 80.0) * Sx
    a["diaphragm_y_mm"] = 0.5 * (yf_d + yb_d)
    a["diaphragm_curv"] = u(0.005, 0.008)
    # the liver: a tapered blob whose top always reaches above the diaphragm, so that the diaphragm shapes the
    # dome; its sampled SI size is the distance from the dome to the inferior border of the right lobe
    si = u(135.0, 175.0)
    liver_semi = [u(180, 220) / 2 * 1.1, u(140, 170) / 2 * 1.1, (si + 45.0) / 2]
    a["liver"] = {
        "size_mm": [2 * liver_semi[0] / 1.1, 2 * liver_semi[1] / 1.1, si],
        "centre_mm": [u(40.0, 65.0) * Sx, 0.5 * (yf_d + yb_d) + u(-5, 10), dome + 45.0 - liver_semi[2] + n(3)],
        "semi_mm": liver_semi,
        "rot_z_deg": n(5.0),
        "taper": u(0.4, 0.55),
        "shift_s": u(0.2, 0.35),
        "shift_q": u(0.15, 0.35),
        "waves": _waves(rng, 4, 0.04),
    }
    # kidneys (right lower than left) --------------------------------------------------------------------
    zr = H * u(200.0, 265.0) + n(4.0)
    zl = zr + u(5.0, 20.0)
    kid = {}
    for side, sgn, zk in (("right", 1.0, zr), ("left", -1.0, zl)):
        _, hw, _, _, _ = body.spine(zk)
        kid[side] = {
            "centre_mm": [sgn * (u(55.0, 70.0) * Sx + max(0.0, float(hw) - 24.0)), ysp(zk) + u(0.0, 15.0), zk],
            "semi_mm": [u(50, 65) / 2, u(40, 50) / 2, u(100, 120) / 2],
            "rot_deg": [-u(5.0, 15.0), sgn * u(8.0, 18.0), sgn * u(20.0, 40.0)],
            "bend": u(0.08, 0.18),
            "waves": _waves(rng, 3, 0.03),
        }
    a["kidneys"] = kid
    # spleen ---------------------------------------------------------------------------------------------
    zs = H * u(310.0, 380.0) + n(4.0)
    a["spleen"] = {
        "centre_mm": [-u(75.0, 100.0) * Sx, ysp(zs) + u(15.0, 32.0), zs],
        "semi_mm": [u(100, 130) / 2, u(60, 80) / 2, u(40, 50) / 2],
        "rot_deg": [-u(20.0, 40.0), -u(10.0, 25.0), u(35.0, 55.0)],
        "bend": u(0.15, 0.3),
        "waves": _waves(rng, 3, 0.04),
    }
    # pancreas -------------------------------------------------------------------------------------------
    zp = H * u(250.0, 300.0) + n(4.0)
    ctrl = [
        [u(25, 45) * Sx, ysp(zp) + u(45, 58), zp - u(15, 30)],
        [u(0, 10), ysp(zp) + u(58, 70), zp + n(3)],
        [-u(30, 40) * Sx, ysp(zp) + u(42, 55), zp + u(5, 20)],
        [-u(75, 92) * Sx, ysp(zp) + u(15, 30), zp + u(20, 38)],
    ]
    a["pancreas"] = {"control_mm": ctrl, "radius_head_mm": u(12.0, 16.0), "radius_tail_mm": u(8.0, 11.0),
                     "lobulation": [u(0.05, 0.15), u(2.0, 5.0), u(0, 2 * math.pi)]}
    # bladder --------------------------------------------------------------------------------------------
    vol = float(math.exp(u(math.log(30.0), math.log(600.0))))
    present = bool(rng.random() >= cfg.bladder_absent_prob)
    r = (3.0 * vol * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    semi = [1.1 * r, 0.95 * r, r / (1.1 * 0.95)]
    zb = H * u(-10.0, 10.0) + semi[2]  # it rests on the pelvic floor: a full bladder reaches higher
    _, yf_b, _ = cav(zb)
    a["bladder"] = {"present": present, "volume_ml": vol, "semi_mm": semi,
                    "centre_mm": [n(4.0), yf_b - semi[1] - u(3.0, 10.0), zb], "waves": _waves(rng, 3, 0.03)}
    # distractors ----------------------------------------------------------------------------------------
    zst = H * u(340.0, 395.0)
    _, yf_s, _ = cav(zst)
    a["stomach"] = {"centre_mm": [-u(35.0, 60.0) * Sx, yf_s - u(45.0, 60.0), zst],
                    "semi_mm": [u(40, 55), u(32, 42), u(55, 75)], "rot_deg": [n(10), u(15, 35), u(-25, -5)],
                    "waves": _waves(rng, 3, 0.06)}
    zg = a["liver"]["centre_mm"][2] - u(40.0, 65.0)
    _, yf_g, _ = cav(zg)
    a["gallbladder"] = {"present": bool(rng.random() < 0.85),
                        "centre_mm": [u(25.0, 50.0) * Sx, yf_g - u(25.0, 40.0), zg],
                        "semi_mm": [u(13, 18), u(13, 18), u(30, 45)], "rot_deg": [u(-30, -10), n(10), n(15)]}
    zh = dome + u(50.0, 70.0)
    _, yf_h, _ = cav(zh)
    a["heart"] = {"centre_mm": [-u(15.0, 35.0), yf_h - u(50.0, 65.0), zh],
                  "semi_mm": [u(60, 72), u(45, 55), u(55, 68)], "rot_deg": [n(5), u(-25, -10), u(20, 40)]}
    a["aorta_radius_mm"] = u(9.0, 12.5)
    a["ivc_radius_mm"] = u(9.0, 13.0)
    # colon: caecum -> ascending -> hepatic flexure -> transverse -> splenic flexure -> descending -> sigmoid
    zc = [H * u(70, 100), H * u(270, 300), H * u(200, 250), H * u(320, 350), H * u(110, 150), H * u(40, 70)]
    pts = []
    for x, z, dy in ((u(80, 100), zc[0], -45), (u(85, 100), zc[1], -40), (u(-10, 10), zc[2], -30),
                     (-u(85, 100), zc[3], None), (-u(90, 105), zc[4], None), (-u(20, 40), zc[5], -45)):
        Ac, yf, yb = cav(z)
        y = yf + dy if dy is not None else yb + u(30, 45)
        xx = float(np.clip(x * Sx, -(Ac - 25), Ac - 25))
        pts.append([xx, y, z])
    pts.append([n(5.0), ysp(H * 40) + 40, H * u(0, 20)])
    a["colon"] = {"control_mm": pts, "radius_mm": u(15.0, 22.0)}
    # small bowel: random walks in the mid/lower abdomen, in front of the kidneys
    loops = []
    for _ in range(int(rng.integers(6, 10))):
        z = H * u(80.0, 240.0)
        Ac, yf, yb = cav(z)
        p = np.array([u(-0.6, 0.6) * Ac, u(yb + 45, yf - 20), z])
        dvec = rng.normal(size=3)
        dvec /= np.linalg.norm(dvec)
        path = [p.tolist()]
        for _ in range(int(rng.integers(10, 20))):
            dvec = dvec + rng.normal(scale=0.6, size=3)
            dvec /= np.linalg.norm(dvec)
            q = p + 12.0 * dvec
            Ac, yf, yb = cav(float(q[2]))
            lim = [(-0.75 * Ac, 0.75 * Ac), (yb + 40, yf - 15), (H * 60.0, H * 260.0)]
            for k, (lo, hi) in enumerate(lim):
                if q[k] < lo or q[k] > hi:
                    dvec[k] = -dvec[k]
                    q[k] = min(max(q[k], lo), hi)
            p = q
            path.append(p.tolist())
        loops.append({"path_mm": path, "radius_mm": u(8.0, 13.0), "water_factor": u(0.7, 1.2)})
    a["bowel_loops"] = loops
    # intensities (fat-bright = 1) -------------------------------------------------------------------------
    liver_w = u(0.55, 0.70)
    liver_ff = float(math.exp(u(math.log(0.02), math.log(0.25))))
    a["signal"] = {
        "subcut_fat": [1.0, u(0.04, 0.09)],
        "visceral_fat": [u(0.86, 0.97), u(0.06, 0.12)],
        "muscle": [u(0.04, 0.12), u(0.45, 0.56)],
        "cortex": [0.03, 0.03],
        "marrow_spine": [u(0.45, 0.65), u(0.28, 0.4)],
        "marrow_pelvis": [u(0.6, 0.8), u(0.18, 0.3)],
        "marrow_femur": [u(0.8, 0.95), u(0.08, 0.15)],
        "disc": [0.05, u(0.35, 0.5)],
        "csf": [0.02, u(0.6, 0.8)],
        "lung": [0.02, 0.04],
        "air": [0.01, 0.01],
        "liver": [liver_w * liver_ff / (1.0 - liver_ff), liver_w],
        "liver_fat_fraction": liver_ff,
        "spleen": [u(0.02, 0.07), liver_w * u(0.92, 1.12)],
        "kidneys": [u(0.02, 0.05), liver_w * u(1.08, 1.25)],
        "pancreas": [u(0.08, 0.3), u(0.45, 0.62)],
        "bowel": [u(0.08, 0.3), u(0.45, 0.62)],
        "colon": [u(0.2, 0.45), u(0.2, 0.45)],
        "artery": [u(0.03, 0.1), u(0.45, 0.65)],
        "vein": [u(0.03, 0.1), u(0.45, 0.65)],
        "stomach": [u(0.05, 0.3), u(0.35, 0.8)],
        "heart": [u(0.03, 0.08), u(0.45, 0.6)],
        "gallbladder": [0.02, u(0.7, 0.95)],
        "bladder": [u(0.01, 0.04), u(0.9, 1.05)],
    }
    # placement in the FOV ------------------------------------------------------------------------------
    fov = np.asarray(cfg.fov_mm)
    zs_ = np.linspace(_CROTCH * H, _TORSO_TOP * H, 200)
    A, B, cy, t = body.torso(zs_)
    la, lb, lcx, lcy, lf = body.legs(zs_)
    half_x = float(max(np.max(A + t), np.max(lcx + la + lf)))
    y_lo = float(min(np.min(cy - B - t), np.min(lcy - lb - lf)))
    y_hi = float(max(np.max(cy + B + t), np.max(lcy + lb + lf)))
    room_x = max(0.0, fov[0] / 2 - half_x - 3.0)
    room_y_lo, room_y_hi = -(fov[1] / 2 + y_lo - 3.0), fov[1] / 2 - y_hi - 3.0
    sx = float(np.clip(u(-1, 1) * cfg.xy_shift_mm, -room_x, room_x))
    sy = u(-1, 1) * cfg.xy_shift_mm
    sy = float(np.clip(sy, min(room_y_lo, 0.0), max(room_y_hi, 0.0)))
    sz = u(-1, 1) * cfg.z_shift_mm
    a["shift_mm"] = [sx, sy, sz]
    a["hip_midpoint_fov_mm"] = [fov[0] / 2 + sx, fov[1] / 2 - 0.5 * (y_lo + y_hi) + sy, cfg.hip_z_mm + sz]
    return a


def _waves(rng: np.random.Generator, k: int, amp: float) -> list[list[float]]:
    """Random low-frequency radius modulation: rows (kp, kq, ks, phase, amplitude)."""
    out = []
    for _ in range(k):
        v = rng.normal(size=3)
        v *= rng.uniform(1.2, 2.8) / np.linalg.norm(v)
        out.append([float(v[0]), float(v[1]), float(v[2]), float(rng.uniform(0, 2 * math.pi)),
                    float(rng.normal(0, amp))])
    return out


# --------------------------------------------------------------------------------------------------- rendering


def _ellipse2d(xw, yw, cx, cy, a, b, w, p=2.0, inset=0.0):
    """Soft occupancy (ny, nx) of a (super)ellipse over a 2D window (1D coordinate arrays)."""
    a, b = max(a - inset, 0.5), max(b - inset, 0.5)
    rc = math.sqrt(a * b)
    beta = F32(rc / (p * w))
    ux = np.abs((xw - F32(cx)) * F32(1.0 / a)) ** F32(p) * beta
    uy = np.abs((yw - F32(cy)) * F32(1.0 / b)) ** F32(p) * beta
    o = np.add.outer(uy, ux)
    np.subtract(F32(0.5) + beta, o, out=o)
    np.clip(o, 0.0, 1.0, out=o)
    return o


def _window(coord: np.ndarray, lo: float, hi: float) -> slice:
    return slice(int(np.searchsorted(coord, lo, "left")), int(np.searchsorted(coord, hi, "right")))


def _paint_body(body: _Body, grid: _Grid, fat: np.ndarray, water: np.ndarray, sig: dict, zd: np.ndarray) -> None:
    """Slice by slice: subcutaneous fat, muscle, cavity, diaphragm, mediastinum, lungs, ribs, spine, psoas."""
    a = body.a
    H, w, wz = body.H, grid.w, grid.wz
    zs = grid.z.astype(np.float64)
    A, B, cy, tf = body.torso(zs)
    la, lb, lcx, lcy, lf = body.legs(zs)
    Ac, yf, yb = body.cavity(zs)
    ysp, vhw, vhd, vdisc, vph = body.spine(zs)
    zd_min = float(zd.min())
    crotch, top = _CROTCH * H, _TORSO_TOP * H
    leg_top = _LEGS_TOP * H
    cav_lo, cav_hi = _CAVITY_LO * H, _CAVITY_HI * H
    sway_a, sway_l, sway_p = a["spine_sway_mm"]
    rib_lo, rib_hi = 230.0 * H, 620.0 * H
    rib_period = 26.0 * H
    tm = body.tm
    x, y = grid.x, grid.y
    A_r, B_r, cy_r, _ = body.torso(450.0 * H)
    ang = np.arctan2((y[:, None] - F32(cy_r)) / F32(B_r), x[None, :] / F32(A_r))
    rib_front = ((np.sin(ang) + 1.0) * 0.5).astype(F32)  # 0 at the back, 1 at the front
    s = {k: (F32(v[0]), F32(v[1])) for k, v in sig.items() if isinstance(v, list)}
    for k, z in enumerate(zs):
        torso_f = min(max((z - crotch) / wz + 0.5, 0.0), 1.0) * min(max((top - z) / wz + 0.5, 0.0), 1.0)
        leg_f = min(max((leg_top - z) / wz + 0.5, 0.0), 1.0)
        if torso_f <= 0 and leg_f <= 0:
            continue
        # window of the slice that holds the body
        xs, ys = [], []
        if torso_f > 0:
            xs += [-(A[k] + tf[k]), A[k] + tf[k]]
            ys += [cy[k] - B[k] - tf[k], cy[k] + B[k] + tf[k]]
        if leg_f > 0:
            xs += [-(lcx[k] + la[k] + lf[k]), lcx[k] + la[k] + lf[k]]
            ys += [lcy[k] - lb[k] - lf[k], lcy[k] + lb[k] + lf[k]]
        wx = _window(x, min(xs) - 2 * w, max(xs) + 2 * w)
        wy = _window(y, min(ys) - 2 * w, max(ys) + 2 * w)
        if wx.stop <= wx.start or wy.stop <= wy.start:
            continue
        xw, yw = x[wx], y[wy]
        F = fat[k, wy, wx]
        W = water[k, wy, wx]
        outer = lean = None
        if torso_f > 0:
            outer = _ellipse2d(xw, yw, 0.0, cy[k], A[k] + tf[k], B[k] + tf[k], w, p=2.4)
            lean = _ellipse2d(xw, yw, 0.0, cy[k], A[k], B[k], w, p=2.4)
            if torso_f < 1:
                outer *= F32(torso_f)
                lean *= F32(torso_f)
        if leg_f > 0:
            for sgn in (1.0, -1.0):
                lo_ = _ellipse2d(xw, yw, sgn * lcx[k], lcy[k], la[k] + lf[k], lb[k] + lf[k], w)
                ll_ = _ellipse2d(xw, yw, sgn * lcx[k], lcy[k], la[k], lb[k], w)
                if leg_f < 1:
                    lo_ *= F32(leg_f)
                    ll_ *= F32(leg_f)
                outer = lo_ if outer is None else np.maximum(outer, lo_, out=outer)
                lean = ll_ if lean is None else np.maximum(lean, ll_, out=lean)
        np.multiply(outer, s["subcut_fat"][0], out=F)
        np.multiply(outer, s["subcut_fat"][1], out=W)
        _blend(F, lean, s["muscle"][0])
        _blend(W, lean, s["muscle"][1])
        # ribs: bands in the thoracic wall whose height drops towards the front
        if rib_lo < z < rib_hi and torso_f > 0:
            front = rib_front[wy, wx]
            phase = (F32(z) + front * F32(55.0 * H)) / F32(rib_period)
            frac = phase - np.floor(phase)
            rib = np.clip(F32(1.0) - np.abs(frac - F32(0.5)) * F32(rib_period / (5.5 + 0.5 * wz)), 0.0, 1.0)
            rib_mid = _ellipse2d(xw, yw, 0.0, cy[k], A[k] - 0.45 * (tm + 6), B[k] - 0.45 * (tm + 6), w)
            rib_in = _ellipse2d(xw, yw, 0.0, cy[k], A[k] - tm - 4, B[k] - tm - 4, w)
            band = np.minimum(rib_mid * (F32(1.0) - rib_in), lean)
            band *= F32(4.0)
            np.clip(band, 0.0, 1.0, out=band)
            rib *= band
            if z < 420.0 * H:  # the lower ribs end in cartilage before the front
                rib *= front < F32(0.8)
            _blend(F, rib, F32(0.35))
            _blend(W, rib, F32(0.2))
        # abdominal / thoracic cavity
        if cav_lo - wz < z < cav_hi + wz and Ac[k] > 2:
            cav_f = min(max((z - cav_lo) / wz + 0.5, 0.0), 1.0) * min(max((cav_hi - z) / wz + 0.5, 0.0), 1.0)
            ycc, bc = 0.5 * (yf[k] + yb[k]), 0.5 * (yf[k] - yb[k])
            cav = _ellipse2d(xw, yw, 0.0, ycc, Ac[k], bc, w, p=_CAV_P)
            if cav_f < 1:
                cav *= F32(cav_f)
            _blend(F, cav, s["visceral_fat"][0])
            _blend(W, cav, s["visceral_fat"][1])
            if z > zd_min - 6:
                zdw = zd[wy, wx]
                dia = np.clip(F32(0.5) + (F32(z) - zdw + F32(3.0)) / F32(wz), 0.0, 1.0)
                dia *= cav
                _blend(F, dia, s["muscle"][0])
                _blend(W, dia, s["muscle"][1])
                above = np.clip(F32(0.5) + (F32(z) - zdw - F32(3.0)) / F32(wz), 0.0, 1.0)
                above *= _ellipse2d(xw, yw, 0.0, ycc, Ac[k], bc, w, p=_CAV_P, inset=3.0)
                if cav_f < 1:
                    above *= F32(cav_f)
                medx = np.clip(F32(0.5) - (np.abs(xw + F32(8.0)) - F32(26.0)) / F32(w), 0.0, 1.0)
                medy = np.clip(F32(0.5) + (yw - F32(ysp[k] - vhd[k])) / F32(w), 0.0, 1.0)
                med = np.multiply.outer(medy, medx)
                med_fat = above * med
                _blend(F, med_fat, s["visceral_fat"][0])
                _blend(W, med_fat, s["visceral_fat"][1])
                lung = above * (F32(1.0) - med)
                _blend(F, lung, s["lung"][0])
                _blend(W, lung, s["lung"][1])
        # spine
        if _SPINE_LO * H - wz < z < _SPINE_HI * H + wz:
            xc = sway_a * math.sin(2 * math.pi * z / sway_l + sway_p)
            hw_, hd_, yc_ = vhw[k], vhd[k], ysp[k]
            sx_ = _window(xw, xc - hw_ - 30, xc + hw_ + 30)
            sy_ = _window(yw, yc_ - hd_ - 50, yc_ + hd_ + 4)
            xs_, ys_ = xw[sx_], yw[sy_]
            Fs, Ws = F[sy_, sx_], W[sy_, sx_]
            frac = vph[k] - math.floor(vph[k])
            vb = _ellipse2d(xs_, ys_, xc, yc_, hw_, hd_, w)
            if frac < vdisc[k]:
                _blend(Fs, vb, s["disc"][0])
                _blend(Ws, vb, s["disc"][1])
            else:
                _blend(Fs, vb, s["cortex"][0])
                _blend(Ws, vb, s["cortex"][1])
                inner = _ellipse2d(xs_, ys_, xc, yc_, hw_, hd_, w, inset=2.5)
                _blend(Fs, inner, s["marrow_spine"][0])
                _blend(Ws, inner, s["marrow_spine"][1])
            # neural arch (pedicles + lamina + spinous process) and the canal
            arch = _ellipse2d(xs_, ys_, xc, yc_ - hd_ - 12, 0.8 * hw_ + 4, 13, w)
            arch = np.maximum(arch, _ellipse2d(xs_, ys_, xc, yc_ - hd_ - 34, 6, 14, w), out=arch)
            if frac >= vdisc[k] + 0.15:
                _blend(Fs, arch, s["marrow_spine"][0])
                _blend(Ws, arch, s["marrow_spine"][1])
            canal = _ellipse2d(xs_, ys_, xc, yc_ - hd_ - 10, 8, 7, w)
            _blend(Fs, canal, s["csf"][0])
            _blend(Ws, canal, s["csf"][1])
        # psoas
        if 55.0 * H < z < 270.0 * H:
            f_ = (270.0 * H - z) / (215.0 * H)
            rp = 7.0 + 17.0 * math.sqrt(f_)
            for sgn in (1.0, -1.0):
                cxp = sgn * (vhw[k] + rp * 0.85 + 2.0 + 12.0 * max(0.0, 1.0 - (z - 55 * H) / (60 * H)))
                ps = _ellipse2d(xw, yw, cxp, ysp[k] + 4.0 + 0.3 * rp, rp, rp * 0.9, w)
                _blend(F, ps, s["muscle"][0])
                _blend(W, ps, s["muscle"][1])


def _paint_field(fat, water, box: _Box, d: np.ndarray, w: float, value, cortex: float = 0.0, marrow=None):
    """Paint a signed-distance field as tissue ``value`` (f, w); with ``cortex`` > 0, paint value as a rim of that
    thickness and ``marrow`` inside."""
    occ = _occ(d, w)
    F, W = fat[box.sl], water[box.sl]
    _blend(F, occ, value[0])
    _blend(W, occ, value[1])
    if cortex > 0 and marrow is not None:
        occ = _occ(d + F32(cortex), w)
        _blend(F, occ, marrow[0])
        _blend(W, occ, marrow[1])


def _union_fields(grid: _Grid, lo, hi, shapes) -> tuple[_Box, np.ndarray] | None:
    """min() of several shapes' signed distances over the box [lo, hi]."""
    box = grid.box(lo, hi)
    if box is None:
        return None
    d = np.full(box.shape, _BIG, dtype=F32)
    for sh in shapes:
        if isinstance(sh, _Tube):
            res = sh.field(grid)
            if res is None:
                continue
            b2, d2 = res
        else:
            b2 = grid.box(sh.lo, sh.hi)
            if b2 is None:
                continue
            d2 = None
        hit = box.intersect(b2)
        if hit is None:
            continue
        mine, theirs = hit
        if d2 is None:
            d2 = sh.sdf(b2)
        np.minimum(d[mine], d2[theirs], out=d[mine])
    return box, d


def _carve(box: _Box, d: np.ndarray, other: tuple[_Box, np.ndarray], margin: float) -> None:
    """In place: remove from d everything within ``margin`` mm of the shape ``other``."""
    ob, od = other
    hit = box.intersect(ob)
    if hit is None:
        return
    mine, theirs = hit
    np.maximum(d[mine], F32(margin) - od[theirs], out=d[mine])


def _render(a: dict, cfg: PhantomConfig, rng: np.random.Generator) -> PhantomSubject:
    grid = _Grid(cfg, np.asarray(a["hip_midpoint_fov_mm"]))
    body = _Body(a)
    H = body.H
    sig = a["signal"]
    V = lambda name: (F32(sig[name][0]), F32(sig[name][1]))  # noqa: E731
    nx, ny, nz = cfg.shape
    fat = np.zeros((nz, ny, nx), dtype=F32)
    water = np.zeros((nz, ny, nx), dtype=F32)
    zd = body.diaphragm(grid)
    _paint_body(body, grid, fat, water, sig, zd)
    w = grid.w

    def cavity_cut(margin: float):
        def cut(box: _Box, d: np.ndarray) -> np.ndarray:
            return np.maximum(d, body.cavity_sdf(box) + F32(margin))
        return cut

    def below_diaphragm(margin: float, inner=None):
        def cut(box: _Box, d: np.ndarray) -> np.ndarray:
            if inner is not None:
                d = inner(box, d)
            zdb = zd[box.sl[1], box.sl[2]][None]
            return np.maximum(d, box.Z - zdb + F32(margin))
        return cut

    def above_diaphragm(margin: float):
        def cut(box: _Box, d: np.ndarray) -> np.ndarray:
            zdb = zd[box.sl[1], box.sl[2]][None]
            return np.maximum(d, zdb - box.Z + F32(margin))
        return cut

    # ---- bones: pelvis, sacrum, femurs ----------------------------------------------------------------------
    hips = np.asarray(a["hips_mm"])
    rh = a["head_radius_mm"]
    hh = a["hip_half_mm"]
    _, B90, cy90, _ = body.torso(90 * H)
    _, Bm30, cym30, _ = body.torso(-30 * H)
    ysp90 = float(body.spine(90 * H)[0])
    ysp60 = float(body.spine(60 * H)[0])
    ysp30 = float(body.spine(30 * H)[0])
    for side, sgn in ((0, 1.0), (1, -1.0)):
        hc = hips[side]
        R = rh[side]
        si = np.array([sgn * 36.0, ysp90 + 10, 95 * H])
        asis = np.array([sgn * (hh + 26.0), cy90 + B90 - 38.0, 100 * H])
        mid = 0.5 * (si + asis) + np.array([sgn * 8.0, -6.0, 0.0])
        ax0 = asis - si
        ax0[2] = 0.0
        ax0 /= np.linalg.norm(ax0)
        ax2 = np.array([0.0, 0.0, 1.0])
        ax1 = np.cross(ax2, ax0)
        wing = _Blob(mid, [0.5 * float(np.linalg.norm(asis - si)) + 12.0, 6.5, 48.0 * H],
                     R=np.vstack([ax0, ax1, ax2]), bend_q=-0.25 * sgn * np.sign(ax1[0] + 1e-9))
        acet = hc + np.array([-sgn * 4.0, -4.0, 0.32 * R + 4.0])
        parts = [
            wing,
            _Tube([acet, [sgn * (hh + 2.0), ysp60 + 28.0, 62 * H], [sgn * 50.0, ysp90 + 16.0, 85 * H]], [15.0, 13.0, 10.0]),
            _Tube([[sgn * (hh - 22.0), 16.0, -6 * H], [sgn * 5.0, cym30 + Bm30 - 24.0, -24 * H]], [9.0, 8.5]),
            _Tube([[sgn * 5.0, cym30 + Bm30 - 26.0, -44 * H], [sgn * (hh - 28.0), -38.0, -74 * H]], [8.0, 9.0]),
            _Tube([[sgn * (hh - 14.0), -22.0, -8 * H], [sgn * (hh - 26.0), -42.0, -72 * H]], [13.0, 12.0]),
            _Tube([[sgn * (hh - 12.0), -30.0, 15 * H], [sgn * 35.0, ysp30 + 14.0, 45 * H]], [11.0, 10.0]),
        ]
        lo = np.array([min(sgn * 10.0, sgn * (hh + 60)), -90.0 + min(0.0, ysp90), -95 * H])
        hi = np.array([max(sgn * 10.0, sgn * (hh + 60)), cy90 + B90 + 10.0, 160 * H])
        res = _union_fields(grid, lo, hi, parts)
        if res is not None:
            box, d = res
            # acetabulum: a shell around the femoral head, open below and laterally
            dist = np.sqrt((box.X - F32(hc[0])) ** 2 + (box.Y - F32(hc[1])) ** 2 + (box.Z - F32(hc[2])) ** 2)
            shell = np.abs(dist - F32(R + 8.5)) - F32(6.0)
            open_ = np.minimum(F32(hc[2] - 0.35 * R) - box.Z, F32(sgn) * (box.X - F32(hc[0])) - F32(0.3 * R))
            shell = np.maximum(shell, open_)
            np.minimum(d, shell, out=d)
            np.maximum(d, F32(R + 2.0) - dist, out=d)  # joint space
            _paint_field(fat, water, box, d, w, V("cortex"), 2.5, V("marrow_pelvis"))
        # femur: head, neck, greater trochanter, shaft, condyle
        troch = np.array([sgn * (hh + 46.0), hc[1] - 12.0, hc[2] - 42.0])
        knee = np.array([sgn * (hh - 14.0), 8.0, -440.0 * H])
        fparts = [
            _Blob(hc, [R, R, R]),
            _Tube([hc, [sgn * (hh + 34.0), hc[1] - 6.0, hc[2] - 30.0]], [0.62 * R, 15.0]),
            _Blob(troch, [17.0, 16.0, 22.0]),
            _Tube([troch + np.array([-sgn * 8.0, 4.0, -8.0]), [sgn * (hh + 30.0), 2.0, -140.0 * H], knee], [15.0, 13.0, 13.5]),
            _Blob(knee + np.array([0, -6.0, -22.0]), [38.0, 30.0, 28.0]),
        ]
        lo = np.array([min(sgn * (hh - 60.0), sgn * (hh + 70.0)), -60.0, -500.0 * H - 10.0])
        hi = np.array([max(sgn * (hh - 60.0), sgn * (hh + 70.0)), 60.0, hc[2] + R + 6])
        res = _union_fields(grid, lo, hi, fparts)
        if res is not None:
            box, d = res
            _paint_field(fat, water, box, d, w, V("cortex"), 3.0, V("marrow_femur"))
    ysac = float(body.spine(45 * H)[0])
    sacrum = _Blob([0.0, ysac + 8.0, 48.0 * H], [58.0 * H, 48.0, 15.0], R=_rot(0, 0, 0)[[2, 0, 1]] @ _rot(-25, 0, 0),
                   taper=0.65, bend_s=-0.35)
    res = _blob_field(grid, sacrum)
    if res is not None:
        _paint_field(fat, water, *res, w, V("cortex"), 2.5, V("marrow_spine"))

    # ---- vessels -------------------------------------------------------------------------------------
    ra, rv = a["aorta_radius_mm"], a["ivc_radius_mm"]

    def ant_spine(z: float, dx: float, gap: float) -> list[float]:
        ysp_, _, hd_, _, _ = body.spine(z)
        return [dx, float(ysp_ + hd_ + gap), z]

    az = np.linspace(105 * H, 470 * H, 8)
    aorta = [ant_spine(z, -14.0, ra + 3.0) for z in az]
    yf_h = float(body.cavity(a["heart"]["centre_mm"][2])[1])
    aorta += [ant_spine(560 * H, -22.0, ra + 2.0), [-10.0, float(body.spine(600 * H)[0]) + 55.0, 612 * H],
              [5.0, yf_h - 45.0, 590 * H], [8.0, yf_h - 55.0, a["heart"]["centre_mm"][2] + 20.0]]
    arteries = [_Tube(aorta, ra)]
    ivc = [ant_spine(z, 22.0, rv + 2.0) for z in np.linspace(95 * H, 420 * H, 7)]
    ivc += [[20.0, ivc[-1][1] + 15.0, a["dome_z_mm"] + 20.0]]
    veins = [_Tube(ivc, rv)]
    bif = aorta[0]
    conf = ivc[0]
    for sgn in (1.0, -1.0):
        arteries.append(_Tube([bif, [sgn * 45.0, bif[1] - 8.0, 55 * H], [sgn * (hh - 22.0), 25.0, 5 * H],
                               [sgn * (hh - 8.0), 30.0, -60 * H], [sgn * (hh - 18.0), 18.0, -300 * H]],
                              [ra * 0.65, 6.5, 6.0, 5.5, 4.5]))
        veins.append(_Tube([conf, [sgn * 42.0, conf[1] - 14.0, 55 * H], [sgn * (hh - 32.0), 14.0, 5 * H],
                            [sgn * (hh - 20.0), 22.0, -60 * H], [sgn * (hh - 26.0), 10.0, -300 * H]],
                           [rv * 0.75, 8.0, 7.5, 7.0, 6.0]))
    # renal veins (the left one passes in front of the aorta), portal and splenic vein
    kid = a["kidneys"]
    for side, sgn in (("right", 1.0), ("left", -1.0)):
        kc = np.asarray(kid[side]["centre_mm"])
        hil = kc + np.array([-sgn * kid[side]["semi_mm"][0] * 0.7, 6.0, 0.0])
        ysp_k, _, hd_k, _, _ = body.spine(float(kc[2]))
        y_ivc = float(ysp_k + hd_k) + rv + 2.0
        pts = [hil, [22.0, y_ivc, kc[2] + 8.0]]
        if side == "left":
            pts.insert(1, [-14.0, float(ysp_k + hd_k) + 2.0 * ra + 9.0, kc[2] + 6.0])
        veins.append(_Tube(pts, 5.5))
    pc = np.asarray(a["pancreas"]["control_mm"])
    pan_path = _smooth_path(pc, 14)
    rph, rpt = a["pancreas"]["radius_head_mm"], a["pancreas"]["radius_tail_mm"]
    tpar = np.linspace(0, 1, len(pan_path))
    lob = a["pancreas"]["lobulation"]
    pan_r = (rph + (rpt - rph) * tpar) * (1.0 + lob[0] * np.sin(2 * math.pi * lob[1] * tpar + lob[2]))
    # splenic vein along the back of the pancreas, from the tail to the confluence behind the neck
    sv = pan_path[4:] + np.column_stack([np.zeros(len(pan_path) - 4), -(pan_r[4:] + 6.0), np.zeros(len(pan_path) - 4)])
    conf_pv = pan_path[4] + np.array([4.0, -(pan_r[4] + 7.0), 0.0])
    lc = a["liver"]["centre_mm"]
    veins.append(_Tube(np.vstack([sv[::-1], conf_pv]), 4.5))
    veins.append(_Tube([conf_pv, [lc[0] - 20.0, conf_pv[1] + 5.0, conf_pv[2] + 45.0], [lc[0], lc[1], lc[2] - 10.0]], [7.0, 7.0, 6.0]))
    for tubes, val in ((arteries, V("artery")), (veins, V("vein"))):
        for tb in tubes:
            res = tb.field(grid)
            if res is not None:
                _paint_field(fat, water, *res, w, val)

    # ---- bowel, colon, duodenum, stomach, gallbladder, heart ---------------------------------------------
    in_cavity = cavity_cut(1.5)
    bowel_val = np.asarray(sig["bowel"], dtype=np.float64)
    for loop in a["bowel_loops"]:
        res = _Tube(loop["path_mm"], loop["radius_mm"], cut=in_cavity).field(grid)
        if res is not None:
            _paint_field(fat, water, *res, w, (F32(bowel_val[0]), F32(bowel_val[1] * loop["water_factor"])))
    # duodenum: C-loop around the pancreatic head
    ph0 = pan_path[0]
    dr = pan_r[0]
    duo = [[lc[0] - 25.0, body.cavity(ph0[2] + 45)[1] - 35.0, ph0[2] + 45.0],
           [ph0[0] + dr + 16.0, ph0[1] + 10.0, ph0[2] + 25.0],
           [ph0[0] + dr + 14.0, ph0[1], ph0[2] - 10.0],
           [ph0[0] + 5.0, ph0[1] - 5.0, ph0[2] - dr - 18.0],
           [-20.0, ph0[1] - 2.0, ph0[2] - dr - 14.0],
           [-45.0, ph0[1] + 10.0, ph0[2] - 5.0]]
    res = _Tube(_smooth_path(duo, 12), 11.0, cut=in_cavity).field(grid)
    if res is not None:
        _paint_field(fat, water, *res, w, V("bowel"))
    col = a["colon"]
    res = _Tube(_smooth_path(col["control_mm"], 40), col["radius_mm"], cut=in_cavity).field(grid)
    if res is not None:
        _paint_field(fat, water, *res, w, V("colon"))
    st = a["stomach"]
    res = _blob_field(grid, _Blob(st["centre_mm"], st["semi_mm"], R=_rot(*st["rot_deg"]), waves=st["waves"],
                                  cut=below_diaphragm(4.0, in_cavity)))
    if res is not None:
        _paint_field(fat, water, *res, w, V("stomach"))
    gb = a["gallbladder"]
    gb_field = None
    if gb["present"]:
        gb_field = _blob_field(grid, _Blob(gb["centre_mm"], gb["semi_mm"], R=_rot(*gb["rot_deg"]), cut=in_cavity))
        if gb_field is not None:
            _paint_field(fat, water, *gb_field, w, V("gallbladder"))
    ht = a["heart"]
    res = _blob_field(grid, _Blob(ht["centre_mm"], ht["semi_mm"], R=_rot(*ht["rot_deg"]),
                                  cut=above_diaphragm(3.0)))
    if res is not None:
        _paint_field(fat, water, *res, w, V("heart"))
    # trachea
    res = _Tube([[0.0, float(body.torso(760 * H)[2]) + 18.0, 780 * H], [0.0, float(body.spine(600 * H)[0]) + 40.0, 590 * H]], 9.0).field(grid)
    if res is not None:
        _paint_field(fat, water, *res, w, V("air"))

    # ---- organs (priority: kidneys > spleen > pancreas > liver; bladder apart) -------------------------
    fields: dict[str, list[tuple[_Box, np.ndarray]]] = {o: [] for o in ORGANS}
    for side in ("right", "left"):
        k_ = kid[side]
        sgn = 1.0 if side == "right" else -1.0
        R = _rot(*k_["rot_deg"])
        R[0] *= sgn  # local p points laterally
        blob = _Blob(k_["centre_mm"], k_["semi_mm"], R=R, bend_p=k_["bend"], waves=k_["waves"],
                     notch=((-1.0, 0.15, 0.0), (0.42, 0.5, 0.3)))
        res = _blob_field(grid, blob)
        if res is not None:
            fields["kidneys"].append(res)
    sp_ = a["spleen"]
    R = _rot(*sp_["rot_deg"])[[2, 1, 0]]  # p: long axis, q: mid, s: thin (medial)
    blob = _Blob(sp_["centre_mm"], sp_["semi_mm"], R=R, bend_s=sp_["bend"], waves=sp_["waves"],
                 cut=below_diaphragm(4.0, cavity_cut(1.0)))
    res = _blob_field(grid, blob)
    if res is not None:
        for kf in fields["kidneys"]:
            _carve(*res, kf, 3.0)
        fields["spleen"].append(res)
    res = _Tube(pan_path, pan_r).field(grid)
    if res is not None:
        for org in ("kidneys", "spleen"):
            for of in fields[org]:
                _carve(*res, of, 2.5)
        fields["pancreas"].append(res)
    lv = a["liver"]
    blob = _Blob(lv["centre_mm"], lv["semi_mm"], R=_rot(0, 0, lv["rot_z_deg"]), e=3.0, taper=lv["taper"],
                 shift_q=lv["shift_q"], shift_s=lv["shift_s"], waves=lv["waves"],
                 cut=below_diaphragm(4.0, cavity_cut(1.0)))
    res = _blob_field(grid, blob)
    if res is not None:
        for org in ("kidneys", "spleen", "pancreas"):
            for of in fields[org]:
                _carve(*res, of, 3.0)
        if gb_field is not None:
            _carve(*res, gb_field, 2.0)
        fields["liver"].append(res)
    bl = a["bladder"]
    if bl["present"]:
        res = _blob_field(grid, _Blob(bl["centre_mm"], bl["semi_mm"], e=2.2, waves=bl["waves"], cut=cavity_cut(0.0)))
        if res is not None:
            fields["bladder"].append(res)
    # paint: perirenal fat, then organs
    for kb, kd in fields["kidneys"]:
        _paint_field(fat, water, kb, kd - F32(7.0), w, V("visceral_fat"))
    for org in ("kidneys", "spleen", "pancreas", "liver", "bladder"):
        for ob, od in fields[org]:
            _paint_field(fat, water, ob, od, w, V(org))
            if org == "kidneys":  # medulla / sinus slightly darker in water
                occ = _occ(od + F32(9.0), w)
                _blend(water[ob.sl], occ, F32(sig["kidneys"][1] * 0.9))
    # masks
    masks_zyx = {}
    volumes = {}
    vox_ml = float(np.prod(grid.sp)) / 1000.0
    for org in ORGANS:
        m = np.zeros((nz, ny, nx), dtype=np.uint8)
        for ob, od in fields[org]:
            m[ob.sl] |= (od <= 0).view(np.uint8)
        masks_zyx[org] = m
    if cfg.annotation_defects and fields["kidneys"] and fields["liver"]:
        kb, kd = fields["kidneys"][0]  # right kidney
        kc = kid["right"]
        top = kc["centre_mm"][2] + 0.3 * kc["semi_mm"][2]
        pole = (kd <= F32(3.0)) & (kb.Z >= F32(top))
        masks_zyx["liver"][kb.sl] |= pole.view(np.uint8)
    for org in ORGANS:
        volumes[org] = float(np.count_nonzero(masks_zyx[org])) * vox_ml
    # ---- texture, bias field, Rician noise ---------------------------------------------------------------
    sigma = cfg.noise * float(rng.uniform(0.8, 1.2))
    _finish(fat, water, grid, cfg, rng, sigma)
    hips_vox = np.stack([grid.to_voxel(hips[0]), grid.to_voxel(hips[1])])
    params = dict(a)
    params["noise_sigma"] = sigma
    params["volumes_ml"] = volumes
    params["spacing_mm"] = [float(v) for v in grid.sp]
    return PhantomSubject(fat=fat.T, water=water.T, masks={o: m.T for o, m in masks_zyx.items()},
                          landmarks=hips_vox, affine=cfg.affine, params=params)


_GAUSS_TABLE: np.ndarray | None = None


def _gauss_table() -> np.ndarray:
    """65536 standard-normal quantiles: a uint16 draw indexes an exactly Gaussian (16-bit quantised) value,
    about 3x faster than ``Generator.standard_normal``; tails reach +-4.3 sigma."""
    global _GAUSS_TABLE
    if _GAUSS_TABLE is None:
        from scipy.special import ndtri

        _GAUSS_TABLE = ndtri((np.arange(65536) + 0.5) / 65536).astype(F32)
    return _GAUSS_TABLE


def _interp_matrix(fine: np.ndarray, nodes: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-kernel interpolation weights (len(fine), len(nodes)) normalised so that iid unit-variance node
    values give a unit-variance field."""
    wgt = np.exp(-0.5 * ((fine[:, None] - nodes[None, :]) / sigma) ** 2)
    wgt[wgt < 1e-6] = 0.0  # no denormals in the float32 products (they are very slow)
    wgt /= np.sqrt(np.sum(wgt ** 2, axis=1, keepdims=True)) + 1e-12
    return wgt


def _finish(fat: np.ndarray, water: np.ndarray, grid: _Grid, cfg: PhantomConfig, rng: np.random.Generator,
            sigma: float) -> None:
    """In place, slice by slice: multiply by exp(bias + texture), then add Rician noise."""
    nz, ny, nx = fat.shape
    fov = np.asarray(cfg.fov_mm)
    sp = grid.sp
    step = 12.0
    axes_f = [(np.arange(n) + 0.5) * s for n, s in zip((nx, ny, nz), sp)]
    axes_c = [np.arange(-step, f + 2 * step, step) for f in fov]
    Ux, Uy, Uz = (_interp_matrix(f, c, step) for f, c in zip(axes_f, axes_c))
    cx, cy, cz = (len(c) for c in axes_c)
    tex_nodes = rng.standard_normal((cz, cy, cx)) * cfg.texture
    # bias: coil profile (brighter towards the body surface), slow random variation, station ripple along z
    X, Y, Z = np.meshgrid(axes_c[2] / fov[2], axes_c[1] / fov[1] - 0.5, axes_c[0] / fov[0] - 0.5, indexing="ij")[::-1]
    g = 1.2 * (X ** 2 + Y ** 2) - 0.1
    for _ in range(3):
        k = rng.normal(size=3) * np.array([2.0, 2.0, 3.0])
        g += 0.35 * np.cos(2 * math.pi * (k[0] * X + k[1] * Y + k[2] * Z) + rng.uniform(0, 2 * math.pi))
    g += 0.3 * np.cos(2 * math.pi * Z * fov[2] / rng.uniform(220.0, 320.0) + rng.uniform(0, 2 * math.pi))
    g /= max(float(np.max(np.abs(g))), 1e-6)
    bias_nodes = cfg.bias * g
    # texture: unit-variance weights; bias: plain averaging weights (it is smooth already)
    Ux_s = Ux / Ux.sum(1, keepdims=True)
    Uy_s = Uy / Uy.sum(1, keepdims=True)
    Uz_s = Uz / Uz.sum(1, keepdims=True)
    tz = np.tensordot(Uz, tex_nodes.reshape(cz, -1), axes=1).reshape(nz, cy, cx)
    bz = np.tensordot(Uz_s, bias_nodes.reshape(cz, -1), axes=1).reshape(nz, cy, cx)
    UyF, UxT = Uy.astype(F32), Ux.T.astype(F32).copy()
    UysF, UxsT = Uy_s.astype(F32), Ux_s.T.astype(F32).copy()
    tz, bz = tz.astype(F32), bz.astype(F32)
    table = _gauss_table() * F32(sigma)
    noise = np.empty((4, ny, nx), dtype=F32)
    for k in range(nz):
        logm = UyF @ tz[k] @ UxT
        logm += UysF @ bz[k] @ UxsT
        np.exp(logm, out=logm)
        np.take(table, rng.integers(0, 65536, size=(4, ny, nx), dtype=np.uint16), out=noise)
        for img, n1, n2 in ((fat[k], noise[0], noise[1]), (water[k], noise[2], noise[3])):
            img *= logm
            img += n1
            np.square(img, out=img)
            np.square(n2, out=n2)
            img += n2
            np.sqrt(img, out=img)


# ------------------------------------------------------------------------------------------------ public API


def generate_subject(seed: int, index: int, cfg: PhantomConfig | None = None) -> PhantomSubject:
    """Generate subject ``index`` of the phantom with ``seed``; deterministic in (seed, index, cfg) alone.

    Args:
        seed: dataset seed (>= 0).
        index: subject number (>= 0).
        cfg: the phantom configuration (default: full size, 256 x 256 x 252).

    Returns:
        PhantomSubject with fat/water (X, Y, Z) float32, masks for every organ of ``ORGANS``, the two femoral-head
        centres (right, left) in voxel coordinates, the affine and the sampled parameters.
    """
    cfg = PhantomConfig() if cfg is None else cfg
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise InputError("seed", f"must be an integer >= 0, got {seed!r}")
    if isinstance(index, bool) or int(index) != index or index < 0:
        raise InputError("index", f"must be an integer >= 0, got {index!r}")
    ss_anat, ss_image = np.random.SeedSequence([int(seed), int(index)]).spawn(2)
    anat = _sample_anatomy(np.random.default_rng(ss_anat), cfg)
    return _render(anat, cfg, np.random.default_rng(ss_image))


def _to_int16(img: np.ndarray) -> np.ndarray:
    """Scale to stored units (fat-bright = INTENSITY_SCALE) and round (values are magnitudes, >= 0)."""
    out = np.multiply(img, F32(INTENSITY_SCALE), dtype=F32)
    out += F32(0.5)
    np.clip(out, 0.0, 32767.0, out=out)
    return out.astype(np.int16)  # truncation of x + 0.5 = rounding for x >= 0


def write_subject(subject: PhantomSubject, subject_dir: str | os.PathLike, comment: str | None = None) -> None:
    """Write ``subject`` into ``subject_dir`` (DESIGN.md folder layout), atomically.

    Files: fat.nii.gz, water.nii.gz (int16, fat-bright tissue about 1000), masks/<organ>.nii.gz (uint8 0/1) for
    every organ, landmarks.txt (right then left femoral-head centre, voxel coordinates). Everything is written
    into a temporary sibling folder that is renamed into place; an existing ``subject_dir`` is replaced.
    """
    subject_dir = Path(subject_dir)
    parent = subject_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{_TMP_PREFIX}{subject_dir.name}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "masks").mkdir(parents=True)
        save_nifti(tmp / "fat.nii.gz", _to_int16(subject.fat), subject.affine)
        save_nifti(tmp / "water.nii.gz", _to_int16(subject.water), subject.affine)
        for organ in ORGANS:
            save_nifti(tmp / "masks" / f"{organ}.nii.gz", subject.masks[organ].astype(np.uint8, copy=False),
                       subject.affine)
        text = "hip joints (femoral-head centres), voxel coordinates x y z: line 1 right, line 2 left"
        write_landmarks(tmp / "landmarks.txt", subject.landmarks, text if comment is None else f"{text}\n{comment}")
        if subject_dir.exists():
            old = parent / f"{_TMP_PREFIX}{subject_dir.name}.{os.getpid()}.old"
            os.rename(subject_dir, old)
            os.rename(tmp, subject_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, subject_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def subject_name(index: int) -> str:
    return f"sub{index:03d}"


def _fingerprint(seed: int, index: int, cfg: PhantomConfig) -> str:
    return json.dumps({"version": PHANTOM_VERSION, "seed": int(seed), "index": int(index), "config": cfg.to_dict()},
                      sort_keys=True, separators=(",", ":"))


def _is_complete(subject_dir: Path, fingerprint: str) -> bool:
    """A subject folder is complete when it holds every file and its landmarks.txt carries the fingerprint."""
    needed = [subject_dir / "fat.nii.gz", subject_dir / "water.nii.gz", subject_dir / "landmarks.txt"]
    needed += [subject_dir / "masks" / f"{o}.nii.gz" for o in ORGANS]
    if not all(p.is_file() for p in needed):
        return False
    try:
        text = (subject_dir / "landmarks.txt").read_text()
    except OSError:
        return False
    return f"# phantom {fingerprint}" in text


def _make_one(job: tuple[int, int, PhantomConfig, str]) -> str:
    seed, index, cfg, out_dir = job
    subject = generate_subject(seed, index, cfg)
    write_subject(subject, Path(out_dir) / subject_name(index), comment=f"phantom {_fingerprint(seed, index, cfg)}")
    return subject_name(index)


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def generate_dataset(out_dir: str | os.PathLike, n_subjects: int, seed: int = 0, cfg: PhantomConfig | None = None,
                     workers: int = 1, progress: bool = True) -> list[Path]:
    """Write subjects ``sub000`` .. ``sub{n-1}`` into ``out_dir`` and, last, ``out_dir/phantom.json``.

    Subjects that are already complete (same seed, index, config and phantom version) are kept; any other
    folder of that name is replaced. ``phantom.json`` (config, seed, n_subjects, version, subject names) is
    removed first and written last, so a folder without it is known to be incomplete.

    Args:
        out_dir: output folder (created).
        n_subjects: number of subjects (>= 1).
        seed: dataset seed (>= 0); subject i depends only on (seed, i, cfg).
        cfg: phantom configuration (default full size).
        workers: processes; > 1 uses a multiprocessing pool.
        progress: print one line per subject to stderr.

    Returns:
        The subject folders, in order.

    Raises:
        InputError: bad n_subjects, seed or workers.
    """
    cfg = PhantomConfig() if cfg is None else cfg
    if isinstance(n_subjects, bool) or int(n_subjects) != n_subjects or n_subjects < 1:
        raise InputError("n_subjects", f"must be an integer >= 1, got {n_subjects!r}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise InputError("seed", f"must be an integer >= 0, got {seed!r}")
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise InputError("workers", f"must be an integer >= 1, got {workers!r}")
    n_subjects, seed, workers = int(n_subjects), int(seed), int(workers)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(out, f"cannot create the output folder ({err.strerror})") from None
    meta_path = out / "phantom.json"
    if meta_path.exists():
        meta_path.unlink()
    for stale in out.glob(f"{_TMP_PREFIX}*"):  # leftovers of an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    dirs = [out / subject_name(i) for i in range(n_subjects)]
    todo = [i for i in range(n_subjects) if not _is_complete(dirs[i], _fingerprint(seed, i, cfg))]
    t0 = time.perf_counter()
    if progress:
        print(f"phantom: {n_subjects - len(todo)} of {n_subjects} subjects already complete in {out}",
              file=sys.stderr, flush=True)
    jobs = [(seed, i, cfg, str(out)) for i in todo]
    done = 0

    def report(name: str) -> None:
        nonlocal done
        done += 1
        if progress:
            el = time.perf_counter() - t0
            print(f"phantom: [{done}/{len(jobs)}] {name}  {el / done:.2f} s/subject", file=sys.stderr, flush=True)

    if workers > 1 and len(jobs) > 1:
        # "spawn": safe in a parent that holds threads (torch, loaders); the children inherit one-thread BLAS
        saved = {v: os.environ.get(v) for v in _THREAD_VARS}
        os.environ.update({v: "1" for v in _THREAD_VARS})
        try:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, len(jobs))) as pool:
                for name in pool.imap_unordered(_make_one, jobs):
                    report(name)
        finally:
            for v, old in saved.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old
    else:
        for job in jobs:
            report(_make_one(job))
    meta = {"version": PHANTOM_VERSION, "seed": seed, "n_subjects": n_subjects, "config": cfg.to_dict(),
            "subjects": [d.name for d in dirs], "organs": list(ORGANS),
            "intensity_scale": INTENSITY_SCALE}
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return dirs


# ------------------------------------------------------------------------------------------------------ CLI


def _config_from_hydra(c) -> tuple[PhantomConfig, dict]:
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(c, "out_dir") or c.get("out_dir") in (None, ""):
        raise InputError("out_dir", "is required, e.g. out_dir=data/phantom")
    raw = OmegaConf.to_container(c, resolve=True)
    keys = {f for f in PhantomConfig.__dataclass_fields__}
    cfg = PhantomConfig(**{k: raw[k] for k in keys if k in raw})
    run = {k: raw.get(k) for k in ("out_dir", "n_subjects", "seed", "workers", "progress")}
    return cfg, run


def _main(c) -> None:
    with exit_on_input_error():
        cfg, run = _config_from_hydra(c)
        for key in ("n_subjects", "seed", "workers"):
            v = run[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise InputError(key, f"expected an integer, got {v!r}")
        generate_dataset(run["out_dir"], run["n_subjects"], run["seed"], cfg, workers=run["workers"],
                         progress=bool(run["progress"]))


def main() -> None:
    """Hydra entry point: ``python -m landmark_unet.data.phantom out_dir=DIR n_subjects=N shape=[X,Y,Z] seed=S``."""
    import hydra

    run_hydra_main(hydra.main(version_base="1.3", config_path="../../conf", config_name="phantom")(_main))


if __name__ == "__main__":
    main()
