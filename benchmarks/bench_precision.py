"""Does bf16-mixed change the result? Two measurements: the gradient, then quick-phantom liver Dice.

    python -m benchmarks.bench_precision [--rounds 5] [--seeds 10] [--first-seed 0] [--epochs 20]
        [--combine earlier.json ...] [--no-gradients] [--no-train]

1. :func:`gradient_fidelity`: the relative error of a bf16-mixed step's gradient against fp32's, same weights and
   batch, beside the spread between minibatches' gradients (SGD's own noise). Half a minute; deterministic on a CPU.
2. The Dice sweep: ``python -m landmark_unet.train -m experiment=quick organ=liver trainer.max_epochs=20
   data.split.round=0..4 trainer.precision=32-true,bf16-mixed seed=0..9`` (the same data, splits and initial
   weights for both precisions); the mean per-body test Dice of each precision and seed over every test body of
   every round; the bf16 - fp32 difference paired by run, its mean with a 95 % t-interval over the seeds (target:
   within 0.01); and the fp32 seed-to-seed SD, the training noise the precision's effect must be told from. That
   noise sets the seeds: 10 seeds (50 pairs, about an hour on 2 CPU cores) left the interval +-0.014 wide, 20
   seeds +-0.008 and 42 seeds +-0.004, the per-run differences being heavy-tailed (one atypical test body that
   models of either precision sometimes miss, seeds that train badly in both; benchmarks/README.md). The runs
   are deterministic in one install, and each seed's fp32 and bf16 runs are paired, so a later sweep of more
   seeds (``--first-seed 10``) joins an earlier one through ``--combine``, even from another machine or install
   (other trajectories for the same seed: seeds 0-27 ran on an Intel Xeon with AMX, 28-41 on an AMD EPYC, whose
   oneDNN kernels round differently; benchmarks/README.md, session 13).
   ``experiment=quick`` trains 6 epochs, too few to converge; 20 epochs (the default here) converge. At quick size the network is 8 channels wide: too small for bf16 to be faster, so no
   speed is claimed here (bench_train and bench_step measure speed at the study's size).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats


def gradient_fidelity(batches: int = 10, train_steps: int = 200) -> dict:
    """How far a bf16-mixed step's gradient lies from the fp32 gradient of the same weights and batch, beside how far
    two minibatches' gradients lie from each other (the noise SGD runs on anyway).

    On the quick phantom's liver training batches (round 4; B = 8 slices of 2 x 64 x 64): the quick network (width 8)
    at its initial weights and after ``train_steps`` fp32 Adam steps, and the study's width (64-1024 channels) at its
    initial weights. For each of ``batches`` batches the gradient of every parameter, concatenated, is computed in
    fp32, under CPU bf16 autocast, and under bf16 autocast with ``model.norm_fp32``; reported as the mean over the
    batches of ||g - g_fp32|| / ||g_fp32|| (and the same for the logits). ``minibatch_spread`` is the mean over the
    batches of ||g_i - mean g|| / ||mean g||, in fp32. On a GPU if there is one (its fp32 reference without TF32),
    else on the CPU. Deterministic on the CPU and a few minutes long: unlike a Dice comparison it is not buried in
    training noise."""
    import copy

    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from benchmarks.common import device as pick_device
    from landmark_unet.models.blocks import norms_in_fp32

    torch.manual_seed(0)
    device = pick_device()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=quick", "organ=liver", "data.split.round=4", f"paths.output_dir={tmp}",
            f"paths.cache_dir={Path('.cache').resolve()}"])
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")

        def to_device(batch: dict) -> dict:  # as in training: float32 image and mask on the device
            return dm.transfer_batch_to_device(batch, device, 0)

        held = [to_device(b) for b in itertools.islice(dm.train_dataloader(), batches)]  # the gradients' batches

        def gradient(module, batch: dict, bf16: bool, norm_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
            module = copy.deepcopy(module)
            if norm_fp32:
                norms_in_fp32(module.net)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = module(batch["image"], batch.get("distance"))
                loss = module.loss(logits, batch["mask"])
            loss.backward()
            return logits.float().detach(), torch.cat([p.grad.flatten() for p in module.parameters()])

        def measure(module) -> dict:
            module.train()
            grad_err = {"bf16": [], "bf16_norm_fp32": []}
            logits_err = {"bf16": [], "bf16_norm_fp32": []}
            reference, logits_apart = [], 0.0
            for batch in held:
                logits32, g32 = gradient(module, batch, bf16=False)
                reference.append(g32)
                logits = {}
                for tag, norm in (("bf16", False), ("bf16_norm_fp32", True)):
                    logits[tag], g = gradient(module, batch, bf16=True, norm_fp32=norm)
                    grad_err[tag].append(float((g - g32).norm() / g32.norm()))
                    logits_err[tag].append(float((logits[tag] - logits32).norm() / logits32.norm()))
                logits_apart = max(logits_apart, float((logits["bf16"] - logits["bf16_norm_fp32"]).abs().max()))
            mean_g = torch.stack(reference).mean(0)
            out = {f"gradient_error_{k}": float(np.mean(v)) for k, v in grad_err.items()}
            out |= {f"logits_{k}_error": float(np.mean(v)) for k, v in logits_err.items()}
            out["logits_norm_fp32_vs_plain_bf16_max_abs"] = logits_apart  # 0: the two forwards are bit-identical
            out["minibatch_spread"] = float(np.mean([float((g - mean_g).norm() / mean_g.norm()) for g in reference]))
            return out

        quick = instantiate(cfg.model).to(device)
        result = {"device": str(device), "quick_initial": measure(quick)}
        optimizer = torch.optim.Adam(quick.parameters(), lr=cfg.model.optimizer.lr)
        quick.train()
        epochs = itertools.chain.from_iterable(dm.train_dataloader() for _ in itertools.count())
        for batch in map(to_device, itertools.islice(epochs, train_steps)):
            optimizer.zero_grad(set_to_none=True)
            quick.loss(quick(batch["image"], batch.get("distance")), batch["mask"]).backward()
            optimizer.step()
        quick.zero_grad(set_to_none=True)
        result[f"quick_after_{train_steps}_fp32_steps"] = measure(quick)
        cfg.model.net.features = 64
        result["study_width_initial"] = measure(instantiate(cfg.model).to(device))
    return result


def sweep(rounds: int, seeds: range, epochs: int, sweep_dir: Path) -> str:
    """Train the quick liver runs (both precisions, every round and seed) into ``sweep_dir``; returns the command."""
    overrides = ["experiment=quick", "organ=liver", f"trainer.max_epochs={epochs}",
                 f"data.split.round={','.join(str(r) for r in range(rounds))}",
                 "trainer.precision=32-true,bf16-mixed", f"seed={','.join(str(s) for s in seeds)}"]
    cmd = [sys.executable, "-m", "landmark_unet.train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}",
           f"paths.cache_dir={Path('.cache').resolve()}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return "python -m landmark_unet.train -m " + " ".join(overrides)


def collect(sweep_dir: Path) -> dict[str, dict[str, float]]:
    """Every run's per-body test Dice in a sweep folder: {"<precision> seed <s> round <r>": {body: Dice}}."""
    out = {}
    for path in sorted(Path(sweep_dir).rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        overrides = dict(o.split("=", 1) for o in metrics["overrides"])
        key = f"{metrics['precision']} seed {int(overrides['seed'])} round {int(overrides['data.split.round'])}"
        out[key] = {b: round(d, 4) for b, d in sorted(metrics["test"]["liver"]["per_body"].items())}
    return out


def summarize(per_body_dice: dict[str, dict[str, float]], earlier_means: dict[tuple[str, int], float] | None = None
              ) -> dict:
    """The statistics of runs given as :func:`collect` returns them: each seed's mean Dice per precision (the mean
    over its rounds' test bodies), and the bf16 - fp32 difference paired by seed, with a 95 % t-interval over the
    seeds (the runs of one seed share nothing but the seed, so the seeds are the independent units).
    ``earlier_means`` adds seeds known only by those means, {(precision, seed): mean Dice over the same rounds}
    (outputs from before every run's per-body Dice was kept)."""
    runs = {}
    for key, bodies in per_body_dice.items():
        precision, _, seed, _, rnd = key.split()
        runs[(precision, int(seed), int(rnd))] = float(np.mean(list(bodies.values())))
    seeds = sorted({s for p, s, _ in runs if p == "32-true"} & {s for p, s, _ in runs if p == "bf16-mixed"})
    rounds = sorted({r for _, _, r in runs})
    missing = [(p, s, r) for p in ("32-true", "bf16-mixed") for s in seeds for r in rounds if (p, s, r) not in runs]
    if missing or not (seeds or earlier_means):
        raise ValueError(f"runs missing for a paired comparison: {missing[:5] or 'no seed has both precisions'}")
    mean = {(p, s): float(np.mean([runs[(p, s, r)] for r in rounds]))  # every round has as many test bodies
            for p in ("32-true", "bf16-mixed") for s in seeds}
    mean = {k: v for k, v in (earlier_means or {}).items() if k[1] not in seeds} | mean
    seeds = sorted({s for p, s in mean if p == "32-true"} & {s for p, s in mean if p == "bf16-mixed"})
    out = {"seeds": seeds, "rounds": rounds, "runs_with_per_body_dice": len(runs)}
    for p, tag in (("32-true", "fp32"), ("bf16-mixed", "bf16")):
        out[f"quick_liver_dice_{tag}"] = float(np.mean([mean[(p, s)] for s in seeds]))
        for s in seeds:
            out[f"quick_liver_dice_{tag}_seed{s}"] = mean[(p, s)]
    per_seed = np.array([mean[("bf16-mixed", s)] - mean[("32-true", s)] for s in seeds])
    out["bf16_dice_difference"] = float(per_seed.mean())  # bf16 - fp32
    out["bf16_dice_difference_per_seed"] = per_seed.tolist()
    per_run = [runs[("bf16-mixed", s, r)] - runs[("32-true", s, r)] for s in seeds for r in rounds
               if ("32-true", s, r) in runs]
    if len(per_run) > 1:
        out["bf16_dice_difference_sd_per_run"] = float(np.std(per_run, ddof=1))
    if len(seeds) > 1:
        half = float(stats.t.ppf(0.975, len(seeds) - 1) * per_seed.std(ddof=1) / np.sqrt(len(seeds)))
        out["bf16_dice_difference_ci95"] = [out["bf16_dice_difference"] - half, out["bf16_dice_difference"] + half]
        # what changing only the seed does, in fp32: the noise the precision's difference sits in
        out["fp32_seed_sd"] = float(np.std([mean[("32-true", s)] for s in seeds], ddof=1))
    return out


def earlier_output(path: Path) -> tuple[dict, dict]:
    """An earlier output of this benchmark (or results.json: its ``precision``) as (per-body Dice of its runs, its
    seeds' means: :func:`summarize` uses a mean only for a seed whose runs are not there)."""
    earlier = json.loads(path.read_text())
    earlier = earlier.get("precision", earlier) if "per_body_dice" not in earlier else earlier
    means = {}
    for key, value in earlier.items():
        for p, tag in (("32-true", "fp32"), ("bf16-mixed", "bf16")):
            prefix = f"quick_liver_dice_{tag}_seed"
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                means[(p, int(key[len(prefix):]))] = value
    if not (means or earlier.get("per_body_dice")):
        raise ValueError(f"{path}: neither per_body_dice nor quick_liver_dice_<precision>_seed<n> figures")
    return earlier.get("per_body_dice", {}), means


def run(rounds: int = 5, seeds: int = 10, epochs: int = 20, first_seed: int = 0, combine: Sequence[Path] = (),
        gradients: bool = True, train: bool = True) -> dict:
    """The gradient comparison, then the Dice sweep over ``seeds`` seeds from ``first_seed``; ``combine`` adds the
    runs of earlier outputs (:func:`earlier_output`: the runs are deterministic, so seeds 0-9 from one output and
    10-19 from another summarise as one 20-seed sweep)."""
    out: dict = {}
    if gradients:
        out["gradients"] = gradient_fidelity()
        trained = next(v for k, v in out["gradients"].items() if k.startswith("quick_after"))
        out["bf16_gradient_error"] = trained["gradient_error_bf16"]  # the headline: a trained network's step
        out["minibatch_gradient_spread"] = trained["minibatch_spread"]
    if train:
        with tempfile.TemporaryDirectory() as tmp:
            out["command"] = sweep(rounds, range(first_seed, first_seed + seeds), epochs, Path(tmp, "sweep"))
            out["per_body_dice"] = collect(Path(tmp, "sweep"))  # every run's, from which the figures are read
    per_body, means = {}, {}
    for path in combine:
        runs, seed_means = earlier_output(path)
        per_body |= runs
        means |= seed_means
    per_body |= out.get("per_body_dice", {})
    if per_body or means:
        out["per_body_dice"] = per_body
        out |= summarize(per_body, means)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--combine", type=Path, nargs="*", default=[],
                    help="earlier outputs (or results.json: its 'precision') whose runs join this one's")
    ap.add_argument("--no-gradients", action="store_true", help="skip the gradient comparison")
    ap.add_argument("--no-train", action="store_true", help="no new runs: only the gradients and --combine")
    args = ap.parse_args()
    print(json.dumps(run(args.rounds, args.seeds, args.epochs, args.first_seed, args.combine, not args.no_gradients,
                         not args.no_train), indent=2))

if __name__ == "__main__":
    main()
