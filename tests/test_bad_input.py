"""Bad input, systematically: one table of malformed inputs across every entry point.

Each case builds one broken input in ``tmp_path`` (a NIfTI file, a mask, a landmarks.txt, a dataset.json, a config
key, a checkpoint), runs the real command line in a subprocess and checks that it stops cleanly
(``conftest.assert_clean_failure``): exit code 2, one stderr line ``error: <file or key>: <problem>`` naming the file
or key and what is wrong, no stack trace, and nothing half-written (no run outputs, predictions, reports or
landmark files, no temporary file, no incomplete cache entry).

Inputs are tiny (32 x 32 x 16 toy subjects, 4-feature networks) and every case fails before any training, so the
cost is mostly the interpreter's start-up. The checkpoint cases derive their broken checkpoints from one tiny run
trained in-process once per module (:func:`trained`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CONF_DIR,
    TRAIN_OUTPUTS,
    assert_clean_failure,
    compose_train,
    run_cli,
    save_run_config,
    write_toy_nnunet,
    write_toy_subject,
)
from hydra import compose, initialize_config_dir

from landmark_unet.data.nifti import nifti_bytes, save_nifti

SHAPE = (32, 32, 16)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
N_SUBJECTS = 6
BAD = "s03"  # the subject a training case breaks (not the first: the others read fine before it)
TINY_TRAIN = ("trainer.max_epochs=1", "model.net.features=4", "data.num_workers=0", "data.batch_size=8")
FOLDER = ("data=folder", "data.root={root}")
NNUNET = ("data=nnunet", "data.root={nn}", "data.channel_names=[fat,water]", "content=both",
          "data.labels={{liver:[liver]}}")

ENTRY_POINTS = {  # entry point -> (module, arguments every case gets, outputs it must not leave behind)
    "train": ("landmark_unet.train", ("hydra.run.dir={tmp}/run", *TINY_TRAIN), TRAIN_OUTPUTS),
    "evaluate": ("landmark_unet.evaluate", ("hydra.run.dir={tmp}/eval", "progress=false"),
                 ("eval/metrics.json", "eval/summary.json", "eval/scores.csv")),
    "predict": ("landmark_unet.predict", ("hydra.run.dir={tmp}/hydra", "output={tmp}/out", "progress=false"),
                ("out",)),
    "detect": ("landmark_unet.landmarks.detect", ("{tmp}/x.nii.gz", "--out", "{tmp}/lm/landmarks.txt"), ("lm",)),
    "phantom": ("landmark_unet.data.phantom", ("out_dir={tmp}/ph", "progress=false"), ("ph",)),
    "report": ("landmark_unet.report", ("{tmp}/runs", "--out", "{tmp}/rep", "--no-plots"), ("rep",)),
}


@dataclass
class World:
    """What a case starts from: a toy dataset in the study's folder layout under ``tmp/data`` and, for the
    checkpoint cases, a copy of the tiny trained run under ``tmp/trained``."""

    tmp: Path

    @property
    def root(self) -> Path:
        return self.tmp / "data"

    @property
    def run(self) -> Path:
        """The copy of the trained run (not ``run``: that is where a failing train case must leave nothing)."""
        return self.tmp / "trained"

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoints" / "last.ckpt"

    @property
    def nn(self) -> Path:
        return self.tmp / "nn"

    def fields(self) -> dict[str, str]:
        return {"tmp": str(self.tmp), "root": str(self.root), "nn": str(self.nn), "ckpt": str(self.ckpt),
                "subject": str(self.root / "s00")}


@dataclass(frozen=True)
class Case:
    """One malformed input: ``build`` breaks the world, ``overrides`` are the command-line arguments (``{root}``,
    ``{nn}``, ``{ckpt}``, ``{subject}``, ``{tmp}`` filled in) and every needle must appear in the error line."""

    id: str
    entry: str
    build: Callable[[World], object]
    overrides: tuple[str, ...]
    needles: tuple[str, ...]
    marks: tuple = field(default=())


# -- builders -------------------------------------------------------------------------------------------------------
def nothing(w: World) -> None:
    """The input is fine; the overrides are what is wrong."""


def write(rel: str, array, affine=AFFINE, dtype=np.float32) -> Callable[[World], None]:
    """Replace ``<root>/<rel>`` by ``array`` with ``affine``."""
    def build(w: World) -> None:
        save_nifti(w.root / rel, np.asarray(array, dtype=dtype), affine)
    return build


def text(rel: str, content: str, base: str = "root") -> Callable[[World], None]:
    def build(w: World) -> None:
        (getattr(w, base) / rel).write_text(content)
    return build


def truncate(path_of: Callable[[World], Path]) -> Callable[[World], None]:
    """Keep the first half of the file's bytes."""
    def build(w: World) -> None:
        p = path_of(w)
        raw = p.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
    return build


def unlink(rel: str) -> Callable[[World], None]:
    return lambda w: (w.root / rel).unlink()


def with_value(value: float, at=(3, 4, 5)) -> np.ndarray:
    a = np.random.default_rng(0).uniform(0, 100, SHAPE).astype(np.float32)
    a[at] = value
    return a


def nnunet(edit: Callable[[dict], object] | None = None) -> Callable[[World], None]:
    """The toy dataset again in the nnU-Net layout under ``tmp/nn``, its dataset.json passed through ``edit``."""
    def build(w: World) -> None:
        write_toy_nnunet(w.nn, w.root)
        if edit is not None:
            path = w.nn / "dataset.json"
            meta = json.loads(path.read_text())
            out = edit(meta)
            path.write_text(out if isinstance(out, str) else json.dumps(meta))
    return build


def run_config(*overrides: str) -> Callable[[World], None]:
    """The run folder of the checkpoint says it was trained with other settings (another model or fusion)."""
    def build(w: World) -> None:
        cfg = compose_train(["data=folder", f"data.root={w.root}", "model.net.features=4", *overrides], w.tmp)
        save_run_config(cfg, w.run)
    return build


def header_dims(w: World) -> None:
    """A NIfTI whose header claims 30000 x 30000 x 16 voxels (a corrupted dim field) for 64 kB of data."""
    import gzip
    import struct

    raw = bytearray(gzip.decompress(nifti_bytes(np.zeros(SHAPE, np.float32), AFFINE)))
    raw[42:46] = struct.pack("<hh", 30000, 30000)
    (w.tmp / "x.nii.gz").write_bytes(gzip.compress(bytes(raw)))


def singular_affine(w: World) -> None:
    """A NIfTI whose sform maps every voxel of a slice to one point (zero spacing along z), no qform."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), None)
    img.header.set_sform(np.diag([2.0, 2.0, 0.0, 1.0]), code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, w.tmp / "x.nii.gz")


def report_run(config: str, metrics: str) -> Callable[[World], None]:
    def build(w: World) -> None:
        run = w.tmp / "runs" / "0"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(config)
        (run / "metrics.json").write_text(metrics)
    return build


def prediction(array, affine=AFFINE) -> Callable[[World], None]:
    def build(w: World) -> None:
        save_nifti(w.tmp / "pred" / "s00_liver.nii.gz", np.asarray(array, np.uint8), affine)
    return build


def fat(w: World) -> Path:
    return w.root / BAD / "fat.nii.gz"


ckpt = World.ckpt.fget

# -- the table ------------------------------------------------------------------------------------------------------
CASES = [
    # NIfTI images
    Case("nifti-truncated-gzip", "train", truncate(fat), FOLDER, (BAD, "fat.nii.gz", "cannot read")),
    Case("nifti-nan", "train", write(f"{BAD}/fat.nii.gz", with_value(np.nan)), FOLDER, (BAD, "fat.nii.gz", "NaN")),
    Case("nifti-inf", "predict", write("s00/water.nii.gz", with_value(-np.inf)),
         ("ckpt={ckpt}", "input={subject}"), ("s00", "water.nii.gz", "Inf")),
    Case("nifti-affines-differ", "train", write(f"{BAD}/water.nii.gz", np.ones(SHAPE), np.diag([-2.0, 2, 3, 1])),
         FOLDER, (BAD, "water.nii.gz", "affine", "fat.nii.gz")),
    Case("nifti-missing", "train", unlink(f"{BAD}/water.nii.gz"), FOLDER, (BAD, "water.nii.gz", "missing")),
    Case("nifti-affines-differ-in-a-batch", "predict", write("s04/water.nii.gz", np.ones(SHAPE), np.diag([2, 2, 3.3, 1])),
         ("ckpt={ckpt}", "input={root}"), ("s04", "water.nii.gz", "affine")),
    Case("nifti-4d", "detect", lambda w: save_nifti(w.tmp / "x.nii.gz", np.zeros((*SHAPE, 2), np.float32), AFFINE),
         (), ("x.nii.gz", "3D", "(32, 32, 16, 2)")),
    Case("nifti-zero-size", "detect", lambda w: save_nifti(w.tmp / "x.nii.gz", np.zeros((32, 32, 0), np.float32),
                                                           AFFINE), (), ("x.nii.gz", "no voxels")),
    Case("nifti-empty-file", "detect", lambda w: (w.tmp / "x.nii.gz").write_bytes(b""), (), ("x.nii.gz", "empty")),
    Case("nifti-2d", "detect", lambda w: save_nifti(w.tmp / "x.nii.gz", np.ones((32, 32), np.float32), AFFINE), (),
         ("x.nii.gz", "3D")),
    Case("nifti-complex", "detect", lambda w: save_nifti(w.tmp / "x.nii.gz", np.ones(SHAPE, np.complex64), AFFINE),
         (), ("x.nii.gz", "complex64")),
    Case("nifti-singular-affine", "detect", singular_affine, (), ("x.nii.gz", "affine")),
    Case("nifti-header-dims", "detect", header_dims, (), ("x.nii.gz", "header")),
    # masks
    Case("mask-non-binary", "train", write(f"{BAD}/masks/kidneys.nii.gz", np.full(SHAPE, 3), dtype=np.uint8),
         FOLDER, (BAD, "kidneys.nii.gz", "not binary")),
    Case("mask-wrong-shape", "train", write(f"{BAD}/masks/spleen.nii.gz", np.zeros((32, 32, 15)), dtype=np.uint8),
         FOLDER, (BAD, "spleen.nii.gz", "shape")),
    Case("mask-affine-differs", "train", write(f"{BAD}/masks/liver.nii.gz", np.zeros(SHAPE), np.diag([2, 2, 2.5, 1.0]),
                                               dtype=np.uint8), FOLDER, (BAD, "liver.nii.gz", "affine")),
    Case("prediction-non-binary", "evaluate", prediction(np.full(SHAPE, 2)),
         ("predictions={tmp}/pred", "references={root}"), ("s00_liver.nii.gz", "not binary")),
    Case("prediction-off-grid", "evaluate", prediction(np.zeros((32, 32, 15))),
         ("predictions={tmp}/pred", "references={root}"), ("s00_liver.nii.gz", "grid")),
    # landmarks.txt
    Case("landmarks-missing-value", "train", text(f"{BAD}/landmarks.txt", "4 5\n15 5 2\n"), FOLDER,
         (BAD, "landmarks.txt", "line 1", "expected 3 numbers")),
    Case("landmarks-text", "train", text(f"{BAD}/landmarks.txt", "4 5 2\nleft hip 2\n"), FOLDER,
         (BAD, "landmarks.txt", "line 2", "not a number")),
    Case("landmarks-out-of-bounds", "train", text(f"{BAD}/landmarks.txt", "4 5 2\n15 5 99\n"), FOLDER,
         (BAD, "landmarks.txt", "outside")),
    Case("landmarks-nan", "train", text(f"{BAD}/landmarks.txt", "4 5 2\nnan 5 2\n"), FOLDER,
         (BAD, "landmarks.txt", "non-finite")),
    Case("landmarks-one-for-two-hips", "train", text(f"{BAD}/landmarks.txt", "4 5 2\n"), (*FOLDER, "fusion=early"),
         (BAD, "landmarks.txt", "pair", "found 1")),
    Case("landmarks-one-given-to-predict", "predict", text("one.txt", "# right hip only\n4 5 2\n", base="tmp"),
         ("ckpt={ckpt}", "input={subject}", "landmarks_file={tmp}/one.txt"), ("one.txt", "pair", "found 1")),
    # dataset.json
    Case("dataset-json-no-labels", "train", nnunet(lambda m: m.pop("labels")), NNUNET, ("dataset.json", "labels")),
    Case("dataset-json-unknown-label", "train", nnunet(), (*NNUNET[:-1], "data.labels={{liver:[hepar]}}"),
         ("dataset.json", "hepar")),
    Case("dataset-json-not-json", "train", nnunet(lambda m: json.dumps(m)[:40]), NNUNET, ("dataset.json", "JSON")),
    Case("dataset-json-missing-channel", "train", nnunet(lambda m: m.update(channel_names={"0": "fat"})), NNUNET,
         ("dataset.json", "channel 1")),
    # configs
    Case("config-unknown-organ", "train", nothing, ("organ=heart",), ("organ", "heart")),
    Case("config-fusion-without-input", "train", nothing, (*FOLDER, "fusion=early", "model.net.fusion=none"),
         ("model.net.fusion", "early")),
    Case("config-crop-not-multiple-of-16", "train", nothing, (*FOLDER, "model=unet3d", "data.crop=200"),
         ("data.crop", "200", "16")),
    Case("config-depth-vs-padding", "train", nothing, (*FOLDER, "model.net.depth=5"),
         ("data.pad_multiple", "32")),
    Case("config-stack-for-2d-model", "train", nothing, (*FOLDER, "data.stack=5"), ("data.stack", "UNet2d")),
    Case("config-unknown-map-encoding", "train", nothing, (*FOLDER, "fusion=early", "landmarks.encoding=cosine"),
         ("landmarks.encoding", "cosine")),
    Case("config-unknown-compile-mode", "train", nothing, (*FOLDER, "model.compile=fast"),
         ("model.compile", "fast", "reduce-overhead")),
    Case("config-network-argument-unknown", "train", nothing, ("+model.net.featurs=3",), ("model.net.featurs:", "featurs")),
    Case("config-network-features-negative", "train", nothing, ("model.net.features=-1",),
         ("model.net.features", "-1")),
    Case("config-learning-rate-negative", "train", nothing, ("model.optimizer.lr=-1",), ("model.optimizer", "-1")),
    Case("config-scheduler-rate-not-a-number", "train", nothing, ("optim=adam_step", "model.scheduler.gamma=x"),
         ("model.scheduler.gamma:", "must be a number", "'x'")),
    Case("config-workers-negative", "train", nothing, ("data.num_workers=-1",), ("data.num_workers", "-1")),
    Case("config-augmentation-not-a-range", "train", nothing, ("augmentation.rotation=-5",),
         ("augmentation.rotation", "[low, high]", "-5")),
    Case("config-precision-unknown", "train", nothing, (*FOLDER, "trainer.precision=fp13"), ("trainer.precision:", "fp13")),
    Case("config-reuse-host-memory-not-a-bool", "train", nothing, (*FOLDER, "reuse_host_memory=sometimes"),
         ("reuse_host_memory", "sometimes", "true or false")),
    Case("config-reuse-host-memory-not-a-bool-predict", "predict", nothing,
         ("ckpt={ckpt}", "input={subject}", "reuse_host_memory=2"), ("reuse_host_memory", "2", "true or false")),
    # checkpoints
    Case("checkpoint-truncated", "evaluate", truncate(ckpt), ("ckpt={ckpt}",), ("last.ckpt", "cannot read")),
    Case("checkpoint-not-a-checkpoint", "predict", lambda w: w.ckpt.write_bytes(np.random.default_rng(0).bytes(4096)),
         ("ckpt={ckpt}", "input={subject}"), ("last.ckpt", "cannot read")),
    Case("checkpoint-of-another-fusion", "predict", run_config("fusion=none"), ("ckpt={ckpt}", "input={subject}"),
         ("last.ckpt", "checkpoint of another model", "fusion 'early' (this run: 'none')")),
    Case("checkpoint-truncated-for-resuming", "train", truncate(ckpt), (*FOLDER, "ckpt_path={ckpt}"),
         ("last.ckpt", "cannot read")),
    Case("checkpoint-of-another-model", "evaluate", run_config("fusion=early", "model=unet3d"), ("ckpt={ckpt}",),
         ("last.ckpt", "checkpoint of another model", "network 'UNet2d' (this run: 'UNet3d')")),
    # other entry points
    Case("phantom-zero-shape", "phantom", nothing, ("shape=[0,32,32]",), ("shape", "positive")),
    Case("report-broken-run-config", "report", report_run("organ: [liver\n", '{"test": {}}'), (),
         ("config.yaml", "YAML")),
    Case("report-metrics-without-per-body", "report", report_run("organ: liver\n", '{"test": {"liver": {}}}'), (),
         ("metrics.json", "per_body")),
]


def test_the_table_is_large_and_spread_out():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert {"train", "evaluate", "predict", "detect", "phantom", "report"} <= {c.entry for c in CASES}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny run with early fusion (so that predict reads landmarks): its folder, with the run config beside
    the checkpoints as a Hydra run leaves it."""
    from landmark_unet.train import train

    tmp = tmp_path_factory.mktemp("trained")
    for i in range(N_SUBJECTS):
        write_toy_subject(tmp / "data", f"s{i:02d}", shape=SHAPE, seed=i)
    cfg = compose_train(["data=folder", f"data.root={tmp / 'data'}", *TINY_TRAIN, "fusion=early", "~logger"],
                        tmp)
    train(cfg)
    save_run_config(cfg, tmp / "run")
    return tmp / "run"


def make_world(tmp_path: Path, trained: Path | None) -> World:
    """The unbroken inputs: the toy dataset and, given the trained run, its copy."""
    world = World(tmp_path)
    for i in range(N_SUBJECTS):
        write_toy_subject(world.root, f"s{i:02d}", shape=SHAPE, seed=i)
    if trained is not None:
        (world.run / "checkpoints").mkdir(parents=True)
        shutil.copytree(trained / ".hydra", world.run / ".hydra")
        shutil.copy(trained / "checkpoints" / "last.ckpt", world.ckpt)
        shutil.copy(trained / "splits.json", world.run / "splits.json")
    return world


def test_the_unbroken_inputs_go_through(trained, tmp_path):
    """Control for the table: what its cases break is fine as built. The trained run predicts a folder of cases
    and one case with ``landmarks_file=``, and the report reads the run. (Evaluating the checkpoint is
    tests/test_train.py's.)"""
    from landmark_unet.predict import predict
    from landmark_unet.report import main as report

    world = make_world(tmp_path, trained)
    (tmp_path / "two.txt").write_text("# right, left\n4 5 2\n15 5 2\n")
    runs = {"all": [f"input={world.root}"], "one": [f"input={world.root / 's02'}", f"landmarks_file={tmp_path}/two.txt"]}
    for name, overrides in runs.items():
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="predict", overrides=[f"ckpt={world.ckpt}", f"output={tmp_path / name}",
                                                            "progress=false", *overrides])
        written = predict(cfg)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(p.name for p in written)
    assert len(list((tmp_path / "all").iterdir())) == N_SUBJECTS
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["s02_liver.nii.gz"]
    shutil.copy(trained / "metrics.json", world.run / "metrics.json")
    report([str(world.run), "--out", str(tmp_path / "rep"), "--no-plots"])
    assert "liver" in (tmp_path / "rep" / "report.md").read_text()


# the train, predict and evaluate entries' cases run in-process in make test (below: a second or two each) and as
# command lines in make test-slow (5-7 s each, nearly all of it importing torch and Lightning), except one case of
# each kept on the command line in make test; the other entries' cases, and tests/test_cli_errors.py, check the
# one-line error and exit code 2 there
CLI_CASES = {"train": "nifti-truncated-gzip", "predict": "nifti-inf", "evaluate": "checkpoint-truncated"}
IN_PROCESS_CASES = [c for c in CASES if CLI_CASES.get(c.entry, c.id) != c.id]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=(*c.marks, *([pytest.mark.slow] if c in IN_PROCESS_CASES
                                                                               else []))) for c in CASES])
def test_bad_input_stops_cleanly(case: Case, tmp_path: Path, request):
    needs_run = any("{ckpt}" in o for o in case.overrides)
    world = make_world(tmp_path, request.getfixturevalue("trained") if needs_run else None)
    case.build(world)
    module, base, outputs = ENTRY_POINTS[case.entry]
    args = [a.format(**world.fields()) for a in (*base, *case.overrides)]
    proc = run_cli(module, args, tmp_path)
    assert_clean_failure(proc, *case.needles, tmp_path=tmp_path, forbidden=outputs)


def run_in_process(entry: str, args: list[str], tmp_path: Path) -> None:
    """What ``python -m landmark_unet.<entry> ARGS`` runs inside its ``@hydra.main``, in this process (the run
    folder Hydra would make is given as the entry's own output key)."""
    if entry == "train":
        from landmark_unet.train import train

        return train(compose_train(args, tmp_path))
    from landmark_unet.evaluate import evaluate
    from landmark_unet.predict import predict

    extra = [f"output_dir={tmp_path / 'eval'}"] if entry == "evaluate" else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=entry, overrides=[*args, *extra])
    (evaluate if entry == "evaluate" else predict)(cfg)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in IN_PROCESS_CASES])
def test_bad_input_stops_in_process(case: Case, tmp_path: Path, request):
    """The train, predict and evaluate cases in this process: the error is an InputError whose line (what the
    command line prints after ``error: ``, exit code 2, by :func:`exit_on_input_error`) holds every needle, and
    nothing is left behind: no run output or prediction, no temporary file, no incomplete cache entry (the
    command-line test's own checks, on that line)."""
    from landmark_unet.errors import input_error_of

    needs_run = any("{ckpt}" in o for o in case.overrides)
    world = make_world(tmp_path, request.getfixturevalue("trained") if needs_run else None)
    case.build(world)
    _, base, outputs = ENTRY_POINTS[case.entry]
    args = [a.format(**world.fields()) for a in (*base, *case.overrides) if not a.startswith("hydra.")]
    with pytest.raises(Exception) as info:
        run_in_process(case.entry, args, tmp_path)
    bad = input_error_of(info.value)
    assert bad is not None, f"not an input error: {info.value!r}"
    line = subprocess.CompletedProcess(args, returncode=2, stdout="", stderr=f"error: {bad}\n")
    assert_clean_failure(line, *case.needles, tmp_path=tmp_path, forbidden=outputs)
