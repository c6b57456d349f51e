"""Dataset layouts on disk -> a list of :class:`Case` records: which file holds which channel, organ and landmark.

Three layouts (DESIGN.md), chosen with ``data.source``:

- ``folder``, the study's: ``<root>/<case>/fat.nii.gz, water.nii.gz, masks/<organ>.nii.gz, landmarks.txt``;
- ``nnunet``, nnU-Net raw (v2): ``<root>/dataset.json``, ``imagesTr/<case>_<XXXX>.nii.gz`` (XXXX the channel index
  named by ``data.channel_names``), ``labelsTr/<case>.nii.gz`` label maps. The Medical Segmentation Decathlon's own
  ``dataset.json`` (``labels`` as ``{"1": "liver"}``, a ``training`` list of 3D single-channel images) is read too.
  Optional, this project's addition: ``landmarksTr/<case>.txt`` in the landmarks.txt format;
- ``totalseg``, TotalSegmentator: ``<root>/<case>/ct.nii.gz`` (or ``mri.nii.gz``: ``data.image_file``) and
  ``<root>/<case>/segmentations/<structure>.nii.gz`` binary masks; when ``femur_right`` and ``femur_left`` masks
  exist, the hip landmarks come from them (:func:`landmark_unet.data.sources.femoral_head_centres`).

An organ maps to one or more label names (``data.labels``, e.g. ``kidneys: [kidney_right, kidney_left]``): its
mask is the union of their voxels. Listing checks names and files; reading them is :mod:`sources`.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from landmark_unet.errors import InputError

LAYOUTS = ("folder", "nnunet", "totalseg")
CHANNELS = ("fat", "water", "single")
FOLDER_CHANNEL_FILES = {"fat": "fat.nii.gz", "water": "water.nii.gz"}
# TotalSegmentator's structure names for the five organs (its CT and MRI tasks use the same names)
TOTALSEG_LABELS = {"liver": ["liver"], "kidneys": ["kidney_right", "kidney_left"], "pancreas": ["pancreas"],
                   "spleen": ["spleen"], "bladder": ["urinary_bladder"]}
FEMURS = ("femur_right", "femur_left")  # the subject's right, then left: the landmarks.txt order


@dataclass(frozen=True)
class LabelPart:
    """Where one part of an organ's mask lives: a file, and the label values in it that belong to the organ
    (None: a binary 0/1 mask file)."""

    path: Path
    values: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Case:
    """The files of one body.

    Attributes:
        name: case identifier (folder or nnU-Net case name).
        images: channel name -> image file.
        labels: organ -> the parts whose union is its mask (empty when the dataset has no reference).
        landmarks: a landmarks.txt file, or None.
        femurs: (right, left) femur masks whose femoral heads give the hip landmarks, or None.
    """

    name: str
    images: dict[str, Path]
    labels: dict[str, tuple[LabelPart, ...]] = field(default_factory=dict)
    landmarks: Path | None = None
    femurs: tuple[Path, Path] | None = None

    def files(self) -> tuple[str, ...]:
        """Every existing file the case is read from (for cache fingerprints)."""
        paths = list(self.images.values()) + [p.path for parts in self.labels.values() for p in parts]
        paths += [self.landmarks] if self.landmarks else []
        paths += list(self.femurs or ())
        return tuple(dict.fromkeys(str(p) for p in paths if p.exists()))


def check_dataset_root(root: str | Path | None) -> Path:
    """The folder of a real dataset (``data.root``): given, and a folder. Checked by ``train`` before anything is
    imported or built (:func:`landmark_unet.config.validate`) and again where the cases are listed.

    Raises:
        InputError: no folder given (names ``data.root``), or it is not a folder (names the path).
    """
    if root is None or str(root) == "":
        raise InputError("data.root", "no dataset folder given (set data.root=DIR)")
    if not Path(root).is_dir():
        raise InputError(root, "data folder is missing (set data.root=DIR)")
    return Path(root)


def list_cases(
    source: str,
    root: str | Path,
    organs: Sequence[str],
    labels: Mapping[str, Sequence[str]] | None = None,
    channel_names: Sequence[str] | None = None,
    image_file: str = "ct.nii.gz",
    include: Sequence[str] | None = None,
) -> list[Case]:
    """The cases of a dataset root, sorted by name.

    Args:
        source: one of :data:`LAYOUTS`.
        root: the dataset folder.
        organs: organs whose label files to locate.
        labels: organ -> label names (nnunet: names in dataset.json; totalseg: structure names, default
            :data:`TOTALSEG_LABELS`). Unused for ``folder``.
        channel_names: nnunet: the channel of each file index ``_0000``, ``_0001``, ... (e.g. ``[fat, water]`` or
            ``[single]``, the default).
        image_file: the image of a TotalSegmentator case (``ct.nii.gz`` or ``mri.nii.gz``).
        include: keep only the cases whose names match one of these fnmatch patterns (e.g. AMOS22's MRI cases).

    Raises:
        InputError: a missing root or dataset.json, no case, an organ without label names, a label name not in
            dataset.json, a channel not in it.
    """
    if source not in LAYOUTS:
        raise InputError("data.source", f"unknown layout {source!r} (choose from {', '.join(LAYOUTS)})")
    root = check_dataset_root(Path(root))
    if source == "folder":
        cases = [folder_case(p, organs) for p in _subfolders(root, lambda p: any(
            (p / f).exists() for f in FOLDER_CHANNEL_FILES.values()))]
        expected = "<case>/fat.nii.gz, water.nii.gz, masks/"
    elif source == "nnunet":
        cases = _nnunet_cases(root, organs, labels or {}, {c: i for i, c in enumerate(channel_names or ["single"])})
        expected = "imagesTr/<case>_0000.nii.gz"
    else:
        cases = _totalseg_cases(root, organs, labels or TOTALSEG_LABELS, image_file)
        expected = f"<case>/{image_file}, <case>/segmentations/"
    if include:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in include)]
        expected += f" named like {', '.join(include)} (data.cases)"
    if not cases:
        raise InputError(root, f"data folder holds no subject (expected {expected})")
    return cases


def labelled_organs(source: str, labels: Mapping[str, Sequence[str]] | None) -> tuple[str, list[str]]:
    """(layout, organs with a reference) of a dataset: all five for the study's layout (and the phantom, which
    writes it) and for TotalSegmentator's default names, else the organs ``labels`` names."""
    from landmark_unet.data.organs import ORGANS

    layout = "folder" if source == "phantom" else source
    if layout == "folder" or (layout == "totalseg" and not labels):
        return layout, list(ORGANS)
    return layout, [o for o in ORGANS if o in (labels or {})]


def _subfolders(root: Path, holds_case) -> list[Path]:
    """Sub-folders of ``root`` that hold a case, sorted; hidden ones (an interrupted writer's) are skipped."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and holds_case(p))


def folder_case(case_dir: Path, organs: Sequence[str]) -> Case:
    """The :class:`Case` of one subject folder of the study's layout."""
    images = {c: case_dir / f for c, f in FOLDER_CHANNEL_FILES.items()}  # a missing one is named when read
    labels = {o: (LabelPart(case_dir / "masks" / f"{o}.nii.gz"),) for o in organs}
    return Case(case_dir.name, images, labels, landmarks=case_dir / "landmarks.txt")


def _organ_names(organs: Sequence[str], labels: Mapping[str, Sequence[str]], where: str) -> dict[str, list[str]]:
    out = {}
    for organ in organs:
        names = labels.get(organ)
        if not names:
            raise InputError(f"data.labels.{organ}", f"no label name given for {organ} in {where}")
        out[organ] = [names] if isinstance(names, str) else list(names)
    return out


def read_dataset_json(root: Path) -> dict:
    """The parsed ``<root>/dataset.json`` (one clear line when missing or malformed)."""
    path = root / "dataset.json"
    if not path.is_file():
        raise InputError(path, "file is missing (an nnU-Net dataset root holds dataset.json)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read JSON ({err.__class__.__name__}: {str(err)[:100]})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise InputError(path, "has no 'labels' mapping")
    return meta


def dataset_label_values(meta: dict, where: Path) -> dict[str, tuple[int, ...]]:
    """Label name -> values, from either form of ``labels``: nnU-Net v2 ``{"liver": 1}`` (or a list of values for
    a region) and MSD / nnU-Net v1 ``{"1": "liver"}``."""
    out: dict[str, tuple[int, ...]] = {}
    for key, value in meta["labels"].items():
        try:
            if isinstance(value, str):  # v1: value -> name
                out[value] = (*out.get(value, ()), int(key))
            else:
                out[str(key)] = tuple(int(v) for v in (value if isinstance(value, list) else [value]))
        except (TypeError, ValueError):
            raise InputError(where, f"label {key!r}: {value!r} is not a label value") from None
    return out


def _nnunet_cases(root: Path, organs, labels, channel_ids) -> list[Case]:
    meta = read_dataset_json(root)
    where = root / "dataset.json"
    values = dataset_label_values(meta, where)
    parts_of = {}
    for organ, names in _organ_names(organs, labels, str(where)).items():
        unknown = [n for n in names if n not in values]
        if unknown:
            raise InputError(where, f"label {unknown[0]!r} (data.labels.{organ}) is not in its labels "
                                    f"({', '.join(values)})")
        parts_of[organ] = tuple(v for n in names for v in values[n])
    declared = meta.get("channel_names") or meta.get("modality") or {}
    for channel, idx in channel_ids.items():
        if channel not in CHANNELS:
            raise InputError("data.channel_names", f"unknown channel {channel!r} (choose from {', '.join(CHANNELS)})")
        if declared and str(idx) not in {str(k) for k in declared}:
            raise InputError(where, f"has no channel {idx} (data.channel_names: {channel}); it declares {dict(declared)}")
    ending = meta.get("file_ending", ".nii.gz")
    # the Decathlon's own layout (and AMOS22's download): a list of image / label pairs of 3D single-channel
    # files. nnU-Net v1 lists its images without the channel suffix: those do not exist as named.
    training = [t for t in meta.get("training") or [] if isinstance(t, dict) and "image" in t and "label" in t
                and (root / str(t["image"])).is_file()]
    if training:
        if len(channel_ids) > 1:
            raise InputError(where, "Decathlon-style 4D multi-channel images are not read; convert the dataset with "
                                    "nnUNetv2_convert_MSD_dataset")
        cases = []
        for item in training:
            image, label = root / item["image"], root / item["label"]
            name = image.name[: -len(ending)] if image.name.endswith(ending) else image.stem
            cases.append(Case(name, {next(iter(channel_ids)): image},
                              {o: (LabelPart(label, v),) for o, v in parts_of.items()},
                              landmarks=root / "landmarksTr" / f"{name}.txt"))
        return sorted(cases, key=lambda c: c.name)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    first = min(channel_ids.values())
    suffix = f"_{first:04d}{ending}"
    names = sorted(p.name[: -len(suffix)] for p in images_dir.glob(f"*{suffix}")
                   if not p.name.startswith(".")) if images_dir.is_dir() else []
    return [Case(n, {c: images_dir / f"{n}_{i:04d}{ending}" for c, i in channel_ids.items()},
                 {o: (LabelPart(labels_dir / f"{n}{ending}", v),) for o, v in parts_of.items()},
                 landmarks=root / "landmarksTr" / f"{n}.txt") for n in names]


def _totalseg_cases(root: Path, organs, labels, image_file: str) -> list[Case]:
    names = _organ_names(organs, labels, "data.labels")
    cases = []
    for d in _subfolders(root, lambda p: (p / image_file).exists()):
        seg = d / "segmentations"
        femurs = tuple(seg / f"{f}.nii.gz" for f in FEMURS)
        cases.append(Case(
            d.name, {"single": d / image_file},
            {o: tuple(LabelPart(seg / f"{n}.nii.gz") for n in ns) for o, ns in names.items()},
            landmarks=d / "landmarks.txt",
            femurs=femurs if all(f.exists() for f in femurs) else None,  # type: ignore[arg-type]
        ))
    return cases


NNUNET_FILE = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})\.nii(\.gz)?$")


def input_cases(path: str | Path, channel_names: Sequence[str], image_file: str = "ct.nii.gz") -> list[Case]:
    """The cases to predict from a file or folder, sorted by name (image channels only; no labels needed).

    Recognised, in this order:

    - a subject folder of the study's layout (``fat.nii.gz`` / ``water.nii.gz`` inside), or a folder of them;
    - a TotalSegmentator case folder (``image_file`` inside), or a folder of them;
    - nnU-Net-named images ``<case>_XXXX.nii.gz``, channel ``XXXX`` being ``channel_names[XXXX]``: one file (its
      sibling channels are found beside it) or a folder of them (e.g. ``imagesTs``);
    - any other ``.nii.gz`` / ``.nii`` file: a one-channel case named after the file (channel ``channel_names[0]``).

    Raises:
        InputError: the path does not exist or holds no image.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "input file or folder is missing")
    if path.is_dir():
        if any((path / f).exists() for f in FOLDER_CHANNEL_FILES.values()):
            return [folder_case(path, ())]
        if (path / image_file).exists():
            return [Case(path.name, {"single": path / image_file}, landmarks=path / "landmarks.txt")]
        subjects = _subfolders(path, lambda p: any((p / f).exists() for f in FOLDER_CHANNEL_FILES.values()))
        if subjects:
            return [folder_case(p, ()) for p in subjects]
        cases = _subfolders(path, lambda p: (p / image_file).exists())
        if cases:
            return [Case(p.name, {"single": p / image_file}, landmarks=p / "landmarks.txt") for p in cases]
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name.endswith((".nii.gz", ".nii")))
    else:
        match = NNUNET_FILE.match(path.name)
        files = sorted(path.parent.glob(f"{match['case']}_[0-9][0-9][0-9][0-9].nii*")) if match else [path]
    grouped: dict[str, dict[str, Path]] = {}
    for f in files:
        match = NNUNET_FILE.match(f.name)
        name, index = (match["case"], int(match["index"])) if match else (re.sub(r"\.nii(\.gz)?$", "", f.name), 0)
        if index < len(channel_names):
            grouped.setdefault(name, {})[channel_names[index]] = f
    if not grouped:
        raise InputError(path, "holds no NIfTI image to predict (.nii.gz)")
    return [Case(name, images) for name, images in sorted(grouped.items())]
