"""Grids: canonical orientation and back is exact for any orientation; resampling and back stays on the grid."""

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL_DIR

from landmark_unet.data import geometry

needs_real = pytest.mark.skipif(not (REAL_DIR / "example_mr_sm.nii.gz").exists(),
                                reason=f"real fixtures not found in {REAL_DIR}")


def reoriented(data: np.ndarray, affine: np.ndarray, perm, flips) -> tuple[np.ndarray, np.ndarray]:
    """The same image with its voxel axes permuted and flipped: same world geometry, another file grid."""
    out = np.transpose(data, perm)
    step = np.zeros((4, 4))
    step[3, 3] = 1
    for new_axis, old_axis in enumerate(perm):
        n = out.shape[new_axis]
        if flips[new_axis]:
            out = np.flip(out, new_axis)
            step[old_axis, new_axis], step[old_axis, 3] = -1, n - 1
        else:
            step[old_axis, new_axis] = 1
    return np.ascontiguousarray(out), affine @ step


ORIENTATIONS = [((0, 1, 2), (False, False, False)), ((0, 1, 2), (True, True, False)),
                ((2, 0, 1), (False, True, False)), ((1, 2, 0), (True, False, True)), ((2, 1, 0), (True, True, True))]


def real_or_toy():
    if (REAL_DIR / "example_mr_sm.nii.gz").exists():
        img = nib.load(REAL_DIR / "example_mr_sm.nii.gz")
        return np.asanyarray(img.dataobj), img.affine
    rng = np.random.default_rng(0)
    return rng.normal(size=(17, 13, 7)).astype(np.float32), np.diag([-3.0, -3.0, 3.0, 1.0])


@pytest.mark.parametrize("perm, flips", ORIENTATIONS)
def test_canonical_and_back_is_exact(perm, flips):
    data, affine = real_or_toy()
    copy, copy_affine = reoriented(data, affine, perm, flips)
    canon, canon_affine = geometry.to_canonical(copy, copy_affine)
    ref, ref_affine = geometry.to_canonical(data, affine)
    np.testing.assert_array_equal(canon, ref)  # every orientation gives the same canonical array
    np.testing.assert_allclose(canon_affine, ref_affine, atol=1e-9)
    assert nib.aff2axcodes(canon_affine) == ("R", "A", "S")
    back = geometry.from_canonical(np.stack([canon, canon * 2]), copy_affine)  # leading axes ride along
    np.testing.assert_array_equal(back[0], copy)
    np.testing.assert_array_equal(back[1], copy * 2)


def test_resampling_round_trip_stays_on_the_grid():
    rng = np.random.default_rng(1)
    shape, spacing = (40, 30, 12), np.array([1.5, 1.5, 5.0])
    smooth = np.fromfunction(lambda i, j, k: np.sin(i / 7) + np.cos(j / 5) + k / 6, shape)
    target = [3.0, 3.0, 2.5]
    tshape = geometry.target_shape(shape, spacing, target)
    assert tshape == (20, 15, 24)
    down = geometry.resample_to(smooth, spacing, target, tshape)
    back = geometry.resample_to(down, target, spacing, shape)
    assert back.shape == shape
    assert np.abs(back - smooth)[2:-2, 2:-2, 1:-1].max() < 0.1  # a smooth field survives
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = rng.normal(size=3)
    new = geometry.resampled_affine(affine, spacing, target)
    # the field of view keeps its corners: voxel -0.5 of both grids is the same world point
    np.testing.assert_allclose(new @ [-0.5, -0.5, -0.5, 1], affine @ [-0.5, -0.5, -0.5, 1])
    np.testing.assert_allclose(geometry.spacing_of(new), target)
    # a point keeps its world position
    p = np.array([[10.0, 7.0, 3.0]])
    q = geometry.resample_points(p, spacing, target)
    np.testing.assert_allclose(affine @ [*p[0], 1], new @ [*q[0], 1])
