"""Property-based tests of the two file readers every entry point shares: landmarks.txt
(:func:`landmark_unet.landmarks.io.read_landmarks`) and NIfTI (:func:`landmark_unet.data.sources.load_nifti`).

For any input a reader either returns what its contract promises or raises :class:`InputError` naming the file,
never another exception; what the writers write, the readers read back.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from landmark_unet.data.geometry import to_canonical
from landmark_unet.data.nifti import nifti_bytes, save_nifti
from landmark_unet.data.sources import load_nifti
from landmark_unet.errors import InputError
from landmark_unet.landmarks.io import format_landmarks, read_landmarks, write_landmarks

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for the module; each example overwrites its file (hypothesis runs examples one after another)."""
    return tmp_path_factory.mktemp("examples")


def write_bytes(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# -- landmarks.txt -------------------------------------------------------------------------------------------------
number_tokens = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from(["nan", "-inf", "1e400", "1,5", "0x10", "1_0", ".", "-", "+3", "4.", ".5", "1e-3", "٣"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6),
)
landmark_lines = st.lists(st.lists(number_tokens, max_size=5).flatmap(
    lambda toks: st.sampled_from([" ", "\t", ",", ", ", " , "]).map(lambda sep: sep.join(toks))).flatmap(
    lambda body: st.sampled_from(["", "  # hip", "#", " #,1 2 3"]).map(lambda tail: body + tail)), max_size=6)


def _check_result(points: np.ndarray) -> None:
    assert isinstance(points, np.ndarray) and points.dtype == np.float64
    assert points.ndim == 2 and points.shape[1] == 3 and len(points) >= 1
    assert np.isfinite(points).all()


@SETTINGS
@given(text=st.one_of(landmark_lines.map("\n".join), st.text(alphabet=st.characters(blacklist_categories=("Cs",)))))
def test_any_text_gives_finite_points_or_an_input_error(scratch, text):
    path = write_bytes(scratch, "landmarks.txt", text.encode("utf-8"))
    try:
        points = read_landmarks(path)
    except InputError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
    else:
        _check_result(points)


@SETTINGS
@given(data=st.binary(max_size=200))
def test_any_bytes_give_finite_points_or_an_input_error(scratch, data):
    path = write_bytes(scratch, "landmarks.txt", data)
    try:
        points = read_landmarks(path, shape=(64, 64, 64))
    except InputError as err:
        assert str(err).startswith(str(path))
    else:
        _check_result(points)
        assert (points >= 0).all() and (points <= 63).all()


finite = st.floats(-1e5, 1e5, allow_nan=False, allow_infinity=False)
points_arrays = hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.just(3)), elements=finite)


@SETTINGS
@given(points=points_arrays,
       comment=st.none() | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_write_then_read_round_trips_to_the_third_decimal(scratch, points, comment):
    path = scratch / "landmarks.txt"
    write_landmarks(path, points, comment)
    back = read_landmarks(path)
    assert back.shape == points.shape
    np.testing.assert_allclose(back, points, rtol=0, atol=5e-4 + 1e-9)  # "%.3f" of |x| <= 1e5


@SETTINGS
@given(points=points_arrays, data=st.data())
def test_comments_blank_lines_and_commas_are_tolerated(scratch, points, data):
    lines = []
    for p in points:
        for _ in range(data.draw(st.integers(0, 2))):
            lines.append(data.draw(st.sampled_from(["", "   ", "\t", "# a comment", "  #x y z", "#1 2 3 4"])))
        sep = data.draw(st.sampled_from([" ", "  ", "\t", ",", ", ", " ,\t"]))
        tail = data.draw(st.sampled_from(["", " ", "# right hip", "  #,,,"]))
        lead = data.draw(st.sampled_from(["", " ", "\t"]))
        lines.append(lead + sep.join(repr(float(v)) for v in p) + tail)
    ending = data.draw(st.sampled_from(["\n", "\r\n"]))
    path = write_bytes(scratch, "landmarks.txt", ending.join(lines).encode())
    np.testing.assert_array_equal(read_landmarks(path), points)


@SETTINGS
@given(shape=st.tuples(*[st.integers(1, 40)] * 3),
       points=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.just(3)),
                         elements=st.floats(-5, 45, allow_nan=False).map(lambda v: round(v, 3))))
def test_points_outside_the_shape_are_refused(scratch, shape, points):
    path = scratch / "landmarks.txt"
    path.write_text(format_landmarks(points))
    outside = ((points < 0) | (points > np.asarray(shape) - 1)).any(axis=1)
    if outside.any():
        with pytest.raises(InputError, match=rf"landmark {int(np.argmax(outside)) + 1} at .* outside the volume"):
            read_landmarks(path, shape=shape)
    else:
        np.testing.assert_array_equal(read_landmarks(path, shape=shape), points)


# -- NIfTI ---------------------------------------------------------------------------------------------------------
DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64]


@st.composite
def affines(draw) -> np.ndarray:
    """Any orientation: an axis permutation with flips, anisotropic spacing, a small rotation, a translation."""
    perm = draw(st.permutations([0, 1, 2]))
    flips = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    spacing = draw(st.lists(st.floats(0.3, 5.0), min_size=3, max_size=3))
    m = np.zeros((3, 3))
    for col, (row, flip, sp) in enumerate(zip(perm, flips, spacing)):
        m[row, col] = flip * sp
    angle = draw(st.floats(-0.3, 0.3))  # radians about z: keeps the closest canonical orientation well defined
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ m
    affine[:3, 3] = draw(st.lists(st.floats(-500, 500), min_size=3, max_size=3))
    return affine


volumes = st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(
    dt, st.tuples(*[st.integers(1, 6)] * 3),
    elements=(st.floats(-1e6, 1e6, width=32) if np.dtype(dt).kind == "f" else hnp.from_dtype(np.dtype(dt)))))


@SETTINGS
@given(array=volumes, affine=affines(), trailing=st.booleans())
def test_save_then_load_round_trips_data_affine_and_canonical_grid(scratch, array, affine, trailing):
    """Also with a trailing axis of length 1 (a 4D file holding one volume, common and valid): it is dropped."""
    path = scratch / "x.nii.gz"
    save_nifti(path, array[..., None] if trailing else array, affine)
    img = load_nifti(path)
    data = np.asanyarray(img.dataobj)
    assert data.shape == array.shape and data.dtype == array.dtype
    np.testing.assert_array_equal(data, array)
    np.testing.assert_allclose(img.affine, affine, rtol=1e-6, atol=1e-4)  # the header holds float32
    canon_data, canon_affine = to_canonical(img.dataobj, img.affine)
    expected = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    np.testing.assert_array_equal(canon_data, np.asanyarray(expected.dataobj))
    np.testing.assert_allclose(canon_affine, expected.affine, rtol=1e-6, atol=1e-4)
    assert nib.aff2axcodes(canon_affine) == ("R", "A", "S")


def _valid_file(array: np.ndarray, gz: bool) -> bytes:
    data = nifti_bytes(array, np.diag([2.0, 3.0, 4.0, 1.0]))
    return data if gz else gzip.decompress(data)


# byte offsets of the NIfTI-1 header fields a reader depends on: sizeof_hdr, dim, datatype, bitpix, pixdim,
# vox_offset, scl_slope, scl_inter, qform_code, sform_code, quatern_b..qoffset_z, srow_x..z, magic
HEADER_FIELDS = [0, 40, 42, 44, 46, 48, 70, 72, 76, 80, 84, 88, 108, 112, 116, 252, 254, 256, 268, 280, 296, 312,
                 328, 344]
header_edits = st.lists(st.tuples(st.one_of(st.sampled_from(HEADER_FIELDS), st.integers(0, 347)),
                                  st.binary(min_size=1, max_size=4)), min_size=1, max_size=4)
stream_edits = st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=2)), min_size=1, max_size=4)


def _assert_reads_or_names_the_file(path: Path) -> None:
    try:
        img = load_nifti(path)
    except InputError as err:
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err), str(err)
    else:
        data = np.asanyarray(img.dataobj)
        assert data.ndim == 3 and 0 not in data.shape and data.dtype.kind in "biuf"
        assert np.isfinite(img.affine).all() and abs(np.linalg.det(img.affine[:3, :3])) > 0


def _edit(buf: bytearray, edits, modulo: int) -> None:
    for pos, value in edits:
        pos %= modulo
        buf[pos: pos + len(value)] = value[: max(0, modulo - pos)]


@SETTINGS
@given(gz=st.booleans(), edits=header_edits, dtype=st.sampled_from([np.uint8, np.int16, np.float32]))
def test_corrupted_headers_raise_an_input_error_naming_the_file(scratch, gz, edits, dtype):
    """Random values in the header fields (dims, data type, offsets, scaling, orientation, magic): the file reads
    as some valid volume or is refused with its name, never another exception and never a huge allocation."""
    raw = bytearray(_valid_file(np.arange(6 * 5 * 4).reshape(6, 5, 4).astype(dtype), gz=False))
    _edit(raw, edits, 348)
    path = write_bytes(scratch, "x.nii.gz" if gz else "x.nii", gzip.compress(bytes(raw), mtime=0) if gz else raw)
    _assert_reads_or_names_the_file(path)


@SETTINGS
@given(gz=st.booleans(), edits=st.none() | stream_edits, cut=st.none() | st.floats(0, 1))
def test_corrupted_or_truncated_files_raise_an_input_error_naming_the_file(scratch, gz, edits, cut):
    """Random byte edits anywhere in the stored file (gzip header, deflate stream, CRC, or the raw NIfTI) and
    truncations: the file reads as some valid volume or is refused with its name, never another exception."""
    assume(edits is not None or cut is not None)
    stored = bytearray(_valid_file(np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4), gz=gz))
    if edits is not None:
        _edit(stored, edits, len(stored))
    if cut is not None:
        stored = stored[: int(cut * len(stored))]
    path = write_bytes(scratch, "x.nii.gz" if gz else "x.nii", bytes(stored))
    _assert_reads_or_names_the_file(path)


@pytest.mark.parametrize("dims", [(30000, 30000, 30000), (2**15 - 1, 2**15 - 1, 16), (-6, 5, 4)])
def test_a_header_declaring_more_voxels_than_the_file_holds_is_refused_before_reading(tmp_path, dims):
    import struct

    raw = bytearray(_valid_file(np.zeros((6, 5, 4), np.float32), gz=False))
    raw[42:48] = struct.pack("<hhh", *dims)
    path = write_bytes(tmp_path, "x.nii.gz", gzip.compress(bytes(raw)))
    with pytest.raises(InputError, match=rf"^{path}: "):
        load_nifti(path)


@settings(max_examples=15, deadline=None)
@given(jitter=hnp.arrays(np.float64, (3, 4), elements=st.floats(-5e-4, 5e-4)))
def test_channels_whose_affines_differ_by_float_rounding_read_as_one_case(tmp_path_factory, jitter):
    """Real files carry affines that differ by rounding (float32 headers, qform vs sform): not an error."""
    from conftest import write_toy_subject

    from landmark_unet.data.sources import read_folder_subject

    d = write_toy_subject(tmp_path_factory.mktemp("jitter"), "s")
    water = nib.load(d / "water.nii.gz")
    affine = water.affine.copy()
    affine[:3] += jitter
    save_nifti(d / "water.nii.gz", np.asanyarray(water.dataobj), affine)
    subject = read_folder_subject(d)
    assert subject.image.shape == (2, 20, 18, 16)
