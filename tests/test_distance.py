import numpy as np
import pytest

from landmark_unet.landmarks import distance_map


def test_study_figure_5():
    """3 x 3 grid, landmarks at (row, column) = (1,3) and (3,2), 1-based. Worked by hand from
    m = sum 1/(1+d_manhattan), divided by its value at a landmark (1 + 1/4 = 5/4)."""
    expected = np.array([
        [(1/3 + 1/4), (1/2 + 1/3), (1 + 1/4)],
        [(1/4 + 1/3), (1/3 + 1/2), (1/2 + 1/3)],
        [(1/5 + 1/2), (1/4 + 1), (1/3 + 1/2)],
    ]) / (5 / 4)
    assert expected[0, 0] == pytest.approx(7 / 15) and expected[2, 0] == pytest.approx(0.56)
    m = distance_map((3, 3), np.array([[0, 2], [2, 1]]))
    assert m.dtype == np.float32 and m.shape == (3, 3)
    np.testing.assert_allclose(m, expected, rtol=1e-6)


@pytest.mark.parametrize("metric", ["manhattan", "euclidean", "gaussian"])
@pytest.mark.parametrize("shape", [(17, 23), (12, 15, 9)])
def test_range_and_peak(metric, shape):
    rng = np.random.default_rng(0)
    pts = rng.integers(0, np.array(shape), size=(2, len(shape)))
    m = distance_map(shape, pts, metric=metric, spacing=[1.5] * len(shape), sigma_mm=6)
    assert m.shape == shape and m.dtype == np.float32
    assert m.min() > 0 and m.max() == 1.0
    assert max(m[tuple(p)] for p in pts) == 1.0


def test_symmetric_pair_gives_a_symmetric_map():
    shape = (21, 11, 9)
    pts = np.array([[5, 5, 4], [15, 5, 4]])  # mirror images about x = 10
    for metric in ("manhattan", "euclidean", "gaussian"):
        m = distance_map(shape, pts, metric=metric, sigma_mm=4)
        np.testing.assert_allclose(m, m[::-1], rtol=1e-6)
        assert m[5, 5, 4] == m[15, 5, 4] == 1.0


def test_mm_units_follow_the_spacing():
    """One landmark; in mm, 2 voxels along z at 4 mm equal 4 voxels along x at 2 mm."""
    m = distance_map((20, 5, 10), np.array([[0, 0, 0]]), metric="manhattan", spacing=(2.0, 1.0, 4.0))
    assert m[4, 0, 0] == pytest.approx(1 / (1 + 8)) and m[0, 0, 2] == pytest.approx(1 / (1 + 8))
    vox = distance_map((20, 5, 10), np.array([[0, 0, 0]]), metric="manhattan")
    assert vox[4, 0, 0] == pytest.approx(1 / 5) and vox[0, 0, 2] == pytest.approx(1 / 3)
    e = distance_map((20, 5, 10), np.array([[0, 0, 0]]), metric="euclidean", spacing=(2.0, 1.0, 4.0))
    assert e[3, 0, 2] == pytest.approx(1 / (1 + np.hypot(6, 8)))


def test_gaussian_width_in_mm():
    m = distance_map((41, 3), np.array([[20, 1]]), metric="gaussian", spacing=(2.0, 2.0), sigma_mm=10)
    assert m[25, 1] == pytest.approx(np.exp(-0.5 * (10 / 10) ** 2), rel=1e-5)  # 5 voxels x 2 mm = one sigma


def test_several_pairs_sum_and_2d_slice_of_3d():
    pts = np.array([[2, 3, 4], [9, 3, 4], [5, 8, 1], [6, 8, 1]])
    m = distance_map((12, 10, 6), pts)
    raw = sum(1 / (1 + np.abs(np.indices((12, 10, 6)) - p[:, None, None, None]).sum(0)) for p in pts)
    np.testing.assert_allclose(m, raw / raw.max(), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((0, 2)), np.zeros((2, 3))])
def test_bad_points(bad):
    with pytest.raises(ValueError):
        distance_map((4, 4), bad)


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        distance_map((4, 4), np.array([[1, 1]]), metric="chebyshev")
