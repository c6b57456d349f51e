"""Training at the study's 2D configuration: the LightningModule against a plain PyTorch loop, fp32 against bf16,
FLOP utilisation, time waiting for data, and seconds per epoch against the study's Table 1.

    python -m benchmarks.bench_train [--steps 3] [--rounds 2] [--subjects 50] [--workers 2] [--no-compile]
                                     [--compile-precisions 32-true,bf16-mixed] [--no-multitask] [--on-device]
                                     [--precisions 32-true,bf16-mixed,16-mixed] [--diagnose]
                                     [--compile-mode reduce-overhead] [--compile-optimizer [both]]

Setting (the study's section 3.4): classic U-Net 64-1024 (channels-last, as the model configs set it), batch 10 of
2 x 256 x 256 fat + water slices of the full-size phantom through the real DataModule and DataLoader (2 workers),
RMSprop (lr 1e-5, momentum 0.9, weight decay 1e-8), BCE with logits. ``--on-device``: both arms take their batches
from ``data.on_device`` (slices gathered in the device's memory, the loader carrying indices only).

- **Lightning vs plain**: the same model, loader, optimiser and precision, once through ``pl.Trainer.fit`` with the
  LightningModule (its TensorBoard logging, callbacks and hooks included) and once through a hand-written loop
  (next batch, to device, autocast forward, loss, backward, step). Arms alternate (L P, then P L) for ``rounds``
  rounds; each arm runs ``steps + 1`` steps and its first (loader start, kernel warm-up) is dropped. Ratio of
  medians of the step times (slices/s Lightning over slices/s plain). On a GPU the times are read from CUDA
  events with no host synchronisation between steps, as in a training run (the host queues the next step while
  the GPU runs this one); a per-step synchronisation would add each arm's host-side cost to every step.
- **bf16**: the same Lightning arms in bf16-mixed, interleaved with the fp32 ones; ``bf16_speedup`` = fp32 step
  time / bf16 step time.
- **FLOP utilisation**: FLOPs of one training step counted by ``torch.utils.flop_counter`` (forward + backward),
  over the Lightning step time, over the peak of a large matmul in the same precision measured in this run.
- **Data wait**: share of the Lightning step time spent between steps (fetch, transfer, batch hooks; on a GPU the
  time the GPU spent between the end of one step and the start of the next).
- **Seconds per epoch**: 800 slices (the study's Table 1: about 800 organ slices per epoch, 100 s single-task and
  170 s multi-task on a GTX 1080) at the measured Lightning step time; the multi-task network (fat only, five heads)
  is timed the same way in bf16-mixed (fp32 on a GPU as well).
- **torch.compile** (``model.compile=true``, or ``--compile-mode``): Lightning arm of the compiled network, after
  the others, then the plain loop with the same compiled network; with ``--compile-optimizer`` both of these arms
  also compile the optimiser's update (``model.compile_optimizer``; it compiles at each arm's first step, which
  the arm drops). ``--compile-optimizer both`` times the compiled network with and without the compiled
  optimiser side by side: their Lightning arms alternate for ``rounds`` rounds, then one plain arm each;
  ``optimizer_compile_speedup``.
- **cuDNN autotuner** (GPU only): the bf16-mixed Lightning arm again with ``trainer.benchmark=true``
  (``torch.backends.cudnn.benchmark``), interleaved with the plain arm; ``cudnn_benchmark_speedup``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import tempfile
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    PEAK_DTYPE,
    datasheet_peak,
    device,
    device_name,
    full_size_datamodule,
    matmul_peak,
    median,
)
from landmark_unet import host_memory
from landmark_unet.config import quiet_third_party
from landmark_unet.inference import autocast
from landmark_unet.lit.optimizer import compile_step
from landmark_unet.lit.segmentation import COMPILE_MODES, SegmentationModule
from landmark_unet.models.multitask import UNet2dMultiTask
from landmark_unet.models.unet2d import UNet2d

STUDY_SLICES_PER_EPOCH = 800
BATCH = 10


def rmsprop():
    return functools.partial(torch.optim.RMSprop, lr=1e-5, weight_decay=1e-8, momentum=0.9)


def study_module(multitask: bool = False, compile: bool | str = False,
                 compile_optimizer: bool = False) -> SegmentationModule:
    torch.manual_seed(0)
    net = UNet2dMultiTask(1, 5) if multitask else UNet2d(2, 1)
    organs = ["liver", "kidneys", "pancreas", "spleen", "bladder"] if multitask else ["liver"]
    return SegmentationModule(net, organs, rmsprop(), channels_last=True, compile=compile,
                              compile_optimizer=compile_optimizer)


class Marks:
    """Points in time on the device's timeline: CUDA events on a GPU (recorded in stream order, no host
    synchronisation, so the host may run ahead as in a real training run), the host clock on a CPU (where the
    work is synchronous)."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    # CUDA events must die in this process: one left in unreachable garbage (the Trainer holds this callback in
    # reference cycles) is inherited by the next arm's forked loader workers, whose garbage collector then destroys
    # it there and kills the worker with "CUDA error: initialization error" (seen on an H200). So the arms drop
    # their marks once read, and collect garbage before the next arm starts its workers.

    def seconds(self, a, b) -> float:
        """Seconds from mark ``a`` to mark ``b`` (waits for ``b`` on a GPU)."""
        if not self.cuda:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1e3


class StepClock(pl.Callback):
    """Per training step: the time from the end of the previous step to the end of this one (so fetching and
    transfer are included), and the part of it before this step started (the wait for data: fetch, transfer to
    the device, the batch hooks). On a GPU both are read from CUDA events, so a wait the host hides behind queued
    work is not counted and an idle GPU is."""

    def __init__(self, dev: torch.device):
        self.marks = Marks(dev)
        self._starts: list = []
        self._ends: list = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._ends = [self.marks.mark()]
        self._starts = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._starts.append(self.marks.mark())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._ends.append(self.marks.mark())

    def times(self) -> tuple[list[float], list[float]]:
        """(step seconds, wait seconds), one each per step; the marks are dropped (see :meth:`Marks.drop`)."""
        steps = [self.marks.seconds(a, b) for a, b in zip(self._ends, self._ends[1:])]
        waits = [self.marks.seconds(a, b) for a, b in zip(self._ends, self._starts)]
        self._ends, self._starts = [], []
        return steps, waits


def lightning_arm(module: SegmentationModule, dm, precision: str, steps: int,
                  benchmark: bool | None = None) -> tuple[list[float], list[float]]:
    """Step times and data waits (s) of ``steps`` steps through Trainer.fit, after one dropped step; ``benchmark``
    is the Trainer's cuDNN-autotuner switch (None: leave torch's setting, off by default)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    clock = StepClock(device())
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator="auto", devices=1, precision=precision, max_epochs=1,
                             limit_train_batches=steps + 1, limit_val_batches=0, num_sanity_val_steps=0,
                             logger=TensorBoardLogger(tmp, name="bench"), log_every_n_steps=10,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[clock], default_root_dir=tmp, benchmark=benchmark)
        trainer.fit(module, datamodule=dm)
    steps_, waits = clock.times()
    del trainer
    gc.collect()
    host_memory.release_free_memory()  # the next arm forks its loader workers from a small heap, as a new run does
    return steps_[1:], waits[1:]


def plain_arm(module: SegmentationModule, dm, precision: str, steps: int, dev: torch.device) -> list[float]:
    """Step times (s) of the same work in a hand-written loop, after one dropped step."""
    net = module.net.to(dev).train()
    optimizer = rmsprop()(net.parameters())
    if module.compile_optimizer:  # as the module's configure_optimizers does
        compile_step(optimizer)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "16-mixed")
    batches = itertools.chain.from_iterable(itertools.repeat(dm.train_dataloader()))  # epochs, end to end
    clock = Marks(dev)
    ends = [clock.mark()]
    for _ in range(steps + 1):
        batch = dm.transfer_batch_to_device(next(batches), dev, 0)  # data.on_device: gathers the slices there
        x = batch["image"].to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = batch["mask"].to(dev, non_blocking=True)
        with autocast(dev, precision):
            logits = net(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none").mean(dim=(0, 2, 3)).sum()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        ends.append(clock.mark())
        del logits, loss  # as Lightning's loop drops its step's tensors
    times = [clock.seconds(a, b) for a, b in zip(ends, ends[1:])]
    del batches, ends
    gc.collect()
    host_memory.release_free_memory()
    return times[1:]


def diagnose(module: SegmentationModule, dm, precision: str, steps: int, dev: torch.device) -> dict:
    """Where the host's time goes, Lightning arm against plain arm: on a GPU the synchronising CUDA calls of each
    arm (``torch.cuda.set_sync_debug_mode``), counted by the Python line that made them; then the functions with
    the most own time in each arm (cProfile, printed)."""
    import collections
    import cProfile
    import io
    import pstats
    import warnings

    out: dict = {}
    for arm in ("lightning", "plain"):
        def run_arm(arm=arm):
            if arm == "lightning":
                return lightning_arm(module, dm, precision, steps)[0]
            return plain_arm(module, dm, precision, steps, dev)

        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run_arm()
            torch.cuda.set_sync_debug_mode(0)
            where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught
                                        if "synchroniz" in str(w.message))
            out[f"syncs_{arm}"] = dict(where.most_common(12))
            print(f"diagnose {arm} {steps + 1} steps, synchronising calls by line: {out[f'syncs_{arm}']}", flush=True)
        profiler = cProfile.Profile()
        profiler.enable()
        times = run_arm()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        out[f"diagnose_step_seconds_{arm}"] = median(times)
        print(f"diagnose {arm} {steps + 1} steps under cProfile, median {median(times) * 1e3:.2f} ms/step:\n"
              f"{text.getvalue()}", flush=True)
    return out


def step_flops(module: SegmentationModule, dev: torch.device, channels: int, batch: int = BATCH) -> int:
    """FLOPs of one training step's forward + backward at batch x channels x 256 x 256 (the optimiser's few
    element-wise FLOPs are not counted)."""
    net = module.net.to(dev)
    x = torch.randn(batch, channels, 256, 256, device=dev).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        net(x).float().sum().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run(steps: int = 3, rounds: int = 2, compile: bool | str = True, multitask: bool = True, subjects: int = 50,
        workers: int = 2, compile_precisions: list[str] | None = None, on_device: bool = False,
        precisions: list[str] | None = None, diagnose_host: bool = False, compile_optimizer: bool | str = False) -> dict:
    quiet_third_party()
    host_memory.reuse_freed_memory(True)  # as the entry points run (reuse_host_memory=true)
    dev = device()
    precisions = precisions or ["32-true", "bf16-mixed"] + (["16-mixed"] if dev.type == "cuda" else [])
    peaks = {p: matmul_peak(PEAK_DTYPE[p], dev) for p in precisions}
    dm = full_size_datamodule(subjects=subjects, workers=workers, on_device=on_device)
    dm.prepare_data()
    dm.setup("fit")
    module = study_module()
    flops = step_flops(module, dev, channels=2)
    if diagnose_host:
        return {"device": device_name(), "on_device": on_device} | diagnose(module, dm, precisions[-1], steps, dev)

    lightning = {p: [] for p in precisions}
    plain = {p: [] for p in precisions}
    waits = {p: [] for p in precisions}
    arm_medians: dict[str, list[float]] = {}
    tag = {"32-true": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}
    for r in range(rounds):
        for p in precisions:
            arms = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")
            for arm in arms:
                if arm == "lightning":
                    times, wait = lightning_arm(module, dm, p, steps)
                    lightning[p] += times
                    waits[p] += wait
                else:
                    times = plain_arm(module, dm, p, steps, dev)
                    plain[p] += times
                arm_medians.setdefault(f"arm_median_seconds_{arm}_{tag[p]}", []).append(median(times))
                print(f"round {r} {p} {arm}: median {median(times) * 1e3:.2f} ms/step, slowest "
                      f"{max(times) * 1e3:.1f} ms", flush=True)
    peaks = {p: max(v, matmul_peak(PEAK_DTYPE[p], dev)) for p, v in peaks.items()}  # best of start and end
    datasheet = {p: datasheet_peak(device_name(), p) for p in precisions}  # None on a CPU and in fp32

    out: dict = {"device": device_name(), "threads": torch.get_num_threads(), "steps_per_arm": steps,
                 "on_device": on_device,
                 "rounds": rounds, "loader_workers": workers, "step_gflop": flops / 1e9} | arm_medians
    for p in precisions:
        lt, pt = median(lightning[p]), median(plain[p])
        out[f"step_seconds_lightning_{tag[p]}"] = lt
        out[f"step_seconds_plain_{tag[p]}"] = pt
        out[f"lightning_vs_plain_ratio_{tag[p]}"] = pt / lt
        out[f"matmul_peak_tflops_{tag[p]}"] = peaks[p] / 1e12
        out[f"mfu_{tag[p]}"] = flops / lt / peaks[p]
        if datasheet[p]:  # the same against the card's datasheet peak
            out[f"mfu_datasheet_{tag[p]}"] = flops / lt / datasheet[p]
        out[f"data_wait_fraction_{tag[p]}"] = sum(waits[p]) / sum(lightning[p])
        out[f"seconds_per_epoch_2d_{tag[p]}"] = STUDY_SLICES_PER_EPOCH / BATCH * lt
    fastest = min(precisions, key=lambda p: out[f"step_seconds_lightning_{tag[p]}"])
    out["lightning_vs_plain_ratio"] = min(out[f"lightning_vs_plain_ratio_{tag[p]}"] for p in precisions)
    if {"32-true", "bf16-mixed"} <= set(precisions):
        out["bf16_speedup"] = out["step_seconds_lightning_fp32"] / out["step_seconds_lightning_bf16"]
    out["data_wait_fraction"] = max(out[f"data_wait_fraction_{tag[p]}"] for p in precisions)
    out["seconds_per_epoch_2d"] = out[f"seconds_per_epoch_2d_{tag[fastest]}"]
    out["seconds_per_epoch_2d_precision"] = fastest

    if dev.type == "cuda" and "bf16-mixed" in precisions:  # the cuDNN autotuner, bf16-mixed, interleaved with the default arm
        tuned, default = [], []
        for r in range(rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                (tuned if on else default).extend(lightning_arm(module, dm, "bf16-mixed", steps, benchmark=on)[0])
        out["step_seconds_lightning_bf16_cudnn_benchmark"] = median(tuned)
        out["cudnn_benchmark_speedup"] = median(default) / median(tuned)
        out["mfu_bf16_cudnn_benchmark"] = flops / median(tuned) / peaks["bf16-mixed"]
        print(f"cudnn benchmark bf16: {median(tuned):.4f} vs {median(default):.4f} s/step", flush=True)
        torch.backends.cudnn.benchmark = False  # the arms below as the ones above (Lightning keeps the last setting)

    if compile:
        out["compile_mode"] = compile if isinstance(compile, str) else "default"
        out["compile_optimizer"] = compile_optimizer
        # arm name -> compiled module; with "both", the optimiser compiled or not, side by side
        variants = ({"compiled": False, "compiled_optimizer": True} if compile_optimizer == "both"
                    else {"compiled": bool(compile_optimizer)})
        modules = {name: study_module(compile=compile, compile_optimizer=opt) for name, opt in variants.items()}
        for p in compile_precisions or precisions:
            times: dict[str, list[float]] = {name: [] for name in modules}
            plain_times: dict[str, list[float]] = {name: [] for name in modules}
            try:
                for name, m in modules.items():
                    t0 = time.perf_counter()
                    lightning_arm(m, dm, p, 1)  # compiles for this precision
                    out[f"compile_seconds_{name.replace('compiled', tag[p])}"] = time.perf_counter() - t0
                # the Lightning arms alternate over the rounds when there are two variants; one round otherwise,
                # then the plain loop with the same compiled network(s)
                for r in range(rounds if len(modules) > 1 else 1):
                    for name in (list(modules) if r % 2 == 0 else list(modules)[::-1]):
                        times[name] += lightning_arm(modules[name], dm, p, steps)[0]
                for name, m in modules.items():
                    plain_times[name] = plain_arm(m, dm, p, steps, dev)  # the same compiled network, own loop
            except Exception as e:  # noqa: BLE001 - keep the figures measured so far
                out[f"compile_error_{tag[p]}"] = f"{type(e).__name__}: {e}"[:300]
                print(f"compiled {p}: failed: {out[f'compile_error_{tag[p]}']}", flush=True)
                continue
            for name in modules:
                lt, pt = median(times[name]), median(plain_times[name])
                out[f"step_seconds_lightning_{name}_{tag[p]}"] = lt
                out[f"mfu_{name}_{tag[p]}"] = flops / lt / peaks[p]
                if datasheet[p]:
                    out[f"mfu_datasheet_{name}_{tag[p]}"] = flops / lt / datasheet[p]
                out[f"step_seconds_plain_{name}_{tag[p]}"] = pt
                out[f"lightning_vs_plain_ratio_{name}_{tag[p]}"] = pt / lt
                print(f"{name} {p}: {lt * 1e3:.2f} ms/step, plain loop {pt * 1e3:.2f}", flush=True)
            out[f"compile_speedup_{tag[p]}"] = (out[f"step_seconds_lightning_{tag[p]}"]
                                                / out[f"step_seconds_lightning_compiled_{tag[p]}"])
            if "compiled_optimizer" in modules:
                out[f"optimizer_compile_speedup_{tag[p]}"] = (
                    out[f"step_seconds_lightning_compiled_{tag[p]}"]
                    / out[f"step_seconds_lightning_compiled_optimizer_{tag[p]}"])
                print(f"compiled {p}: the optimiser compiled too, {out[f'optimizer_compile_speedup_{tag[p]}']:.3f}x",
                      flush=True)

    if multitask:
        mdm = full_size_datamodule(subjects=subjects, workers=workers, channels=("fat",),
                                   organs=("liver", "kidneys", "pancreas", "spleen", "bladder"))
        mdm.prepare_data()
        mdm.setup("fit")
        mt = study_module(multitask=True)
        for p in precisions[1:] if dev.type == "cpu" else precisions:  # fp32 takes ~45 s a step on 2 CPU cores
            times, _ = lightning_arm(mt, mdm, p, max(steps - 1, 1))
            out[f"step_seconds_multitask_{tag[p]}"] = median(times)
            out[f"seconds_per_epoch_multitask_{tag[p]}"] = STUDY_SLICES_PER_EPOCH / BATCH * median(times)
            print(f"multitask {p}: {median(times):.3f} s/step", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--subjects", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2, help="loader (and phantom, cache) workers")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile mode of the compiled arms")
    ap.add_argument("--compile-precisions", help="comma-separated; default: every precision of the run")
    ap.add_argument("--compile-optimizer", nargs="?", const="on", choices=("on", "both"),
                    help="on: the compiled arms also compile the optimiser's update (model.compile_optimizer); "
                         "both: compiled arms with and without it, side by side")
    ap.add_argument("--no-multitask", action="store_true")
    ap.add_argument("--on-device", action="store_true", help="data.on_device: batches gathered on the device")
    ap.add_argument("--precisions", help="comma-separated, fp32 and bf16-mixed first; default: 32-true,bf16-mixed "
                                         "(and 16-mixed on a GPU)")
    ap.add_argument("--diagnose", action="store_true",
                    help="instead of the figures: where the host's time goes in each arm, in the last precision")
    args = ap.parse_args()
    compile_precisions = args.compile_precisions.split(",") if args.compile_precisions else None
    compile = False if args.no_compile else (args.compile_mode or True)
    print(json.dumps(run(args.steps, args.rounds, compile, not args.no_multitask, args.subjects,
                         args.workers, compile_precisions, args.on_device,
                         args.precisions.split(",") if args.precisions else None, args.diagnose,
                         {None: False, "on": True}.get(args.compile_optimizer, args.compile_optimizer)), indent=2))


if __name__ == "__main__":
    main()
