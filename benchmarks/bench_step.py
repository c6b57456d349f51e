"""The study's 2D training step alone, on batches already in the device's memory: where its time goes and how
close it comes to the machine's matmul peak, as the batch grows and with the step captured as a CUDA graph.

    python -m benchmarks.bench_step [--batches 10,20,40] [--steps 30] [--rounds 2] [--precision bf16-mixed]
                                    [--variants eager,graph,compiled] [--no-profile]

Network and step as ``bench_train``'s plain loop (classic U-Net 64-1024, channels-last, RMSprop, BCE with logits,
autocast), without the loader: the FLOP utilisation this step can reach at all, against which ``bench_train``'s
figures (loader, Lightning) are read. Variants, side by side and alternating over ``rounds``:

- ``eager``: the step as written, one kernel launch at a time;
- ``eager_cudnn_benchmark``: with cuDNN's autotuner (``torch.backends.cudnn.benchmark``; GPU only);
- ``graph``: forward, backward and optimiser step captured once as a CUDA graph and replayed (GPU only; what
  launch overhead and per-kernel gaps cost the eager step);
- ``compiled``, ``compiled_graph``: the network compiled by ``torch.compile`` (``model.compile=true``; its
  fusions of batch norm, ReLU, pooling and concatenation), eager and captured (named with ``--variants``);
- ``eager_transposed_conv``, ``eager_upconv_matrix_product``: eager with the up-convolutions run by
  ``nn.ConvTranspose2d``'s kernel, or as a 1x1 convolution and a copy, on every device (by default the latter on a
  CPU only: :class:`~landmark_unet.models.blocks.UpConv2x2`);
- ``eager_relu_in_place``: eager with every ReLU in place on a CPU in bf16 too (by default there it writes a new
  tensor: :class:`~landmark_unet.models.blocks.ReLU`);
- ``eager_compiled_optimizer``: eager, with the optimiser's update compiled (``model.compile_optimizer``:
  :func:`~landmark_unet.lit.optimizer.compile_step`; it compiles at the first step, before the timing);
- ``eager_split_norm_relu``: eager with every BatchNorm and the ReLU after it as one autograd function of four
  loops compiled by Inductor (:class:`benchmarks.bench_norm_relu.SplitNormReLU`; measured, not shipped);
- ``eager_norm_fp32``: eager with every BatchNorm (and the ReLU after it) in fp32 under mixed precision
  (``model.norm_fp32=true``);
- ``eager_release_memory``: eager with glibc's default of giving large freed blocks back to the system
  (``reuse_host_memory=false``); every other variant runs as the entry points do, with freed memory kept for
  reuse (:mod:`landmark_unet.host_memory`). Reported with the page faults and system time per step.

Times are GPU-event times of ``steps`` steps in a row, with no host synchronisation between them (the throughput
a training run gets); MFU is FLOPs per step (``torch.utils.flop_counter``) over that time over a large matmul's
FLOP/s measured in this run. Profile (unless ``--no-profile``), at the first batch size: on a GPU, the eager step
(the compiled one when ``compiled`` is among the variants) under ``torch.profiler``, its GPU kernel time summed by
kind (convolution, batch norm, element-wise, ...) and the GPU's busy time per step; on a CPU, the eager step's
ATen ops timed one by one (:class:`OpTimes`) and summed by kind, and the FLOP/s of its convolutions alone.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import resource
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_norm_relu import split_norm_relu
from benchmarks.bench_train import Marks, rmsprop, step_flops, study_module
from benchmarks.common import PEAK_DTYPE, datasheet_peak, device, device_name, matmul_peak, median
from landmark_unet import host_memory
from landmark_unet.lit.optimizer import compile_step
from landmark_unet.models.blocks import ReLU, UpConv2x2, norms_in_fp32
from landmark_unet.models.unet2d import UNet2d


def study_step(batch: int, precision: str, dev: torch.device, graph: bool = False, compile: bool = False,
               upconv_as_matrix_product: bool | None = None, norm_fp32: bool = False,
               compile_optimizer: bool = False, split_norm: bool = False):
    """A zero-argument function running one training step of a fresh study network on a fixed random batch
    (B, 2, 256, 256); with ``graph`` the step is captured as a CUDA graph and the function replays it; with
    ``compile`` the network is compiled by ``torch.compile`` (default mode) first; ``upconv_as_matrix_product``:
    how its up-convolutions run (:class:`UpConv2x2`; None: as in training, a matrix product on the CPU only);
    ``norm_fp32``: BatchNorm in fp32 under mixed precision (``model.norm_fp32``, :func:`norms_in_fp32`);
    ``compile_optimizer``: the optimiser's update compiled (:func:`compile_step`; not with ``graph``);
    ``split_norm``: BatchNorm + ReLU as :class:`~benchmarks.bench_norm_relu.SplitNormReLU`."""
    torch.manual_seed(0)
    net = UNet2d(2, 1).to(dev).to(memory_format=torch.channels_last).train()
    for m in net.modules():
        if isinstance(m, UpConv2x2):
            m.as_matrix_product = upconv_as_matrix_product
    if norm_fp32:
        norms_in_fp32(net)
    if split_norm:
        split_norm_relu(net)
    if compile:
        net.compile()
    opt = rmsprop()(net.parameters(), capturable=graph)
    if compile_optimizer:
        compile_step(opt)
    x = torch.randn(batch, 2, 256, 256, device=dev).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, 256, 256, device=dev) > 0.5).float()
    dtype = PEAK_DTYPE[precision]
    autocast = functools.partial(torch.autocast, dev.type, dtype=dtype, enabled=dtype != torch.float32,
                                 cache_enabled=not graph)  # a graph must not keep autocast's weight-cast cache

    def step() -> None:
        with autocast():
            logits = net(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if not graph:
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (optimiser state, cuDNN plans) off the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        with autocast():
            logits = net(x)
        F.binary_cross_entropy_with_logits(logits.float(), y).backward()
        opt.step()
    return g.replay


def time_steps(step, steps: int, dev: torch.device) -> tuple[float, float, float]:
    """Seconds per step of ``steps`` steps in a row after two warm-up steps (GPU events; wall time on a CPU), and
    the process's page faults and system-time seconds per step over them."""
    for _ in range(2):
        step()
    marks = Marks(dev)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = marks.mark()
    for _ in range(steps):
        step()
    seconds = marks.seconds(start, marks.mark()) / steps
    after = resource.getrusage(resource.RUSAGE_SELF)
    return seconds, (after.ru_minflt - before.ru_minflt) / steps, (after.ru_stime - before.ru_stime) / steps


KINDS = (  # kernel-name fragments (lower case) -> kind; the first match wins
    ("fused by torch.compile (Triton)", ("triton",)),
    ("convolution", ("conv", "cudnn", "xmma", "implicit", "wgrad", "dgrad", "fprop", "sm90", "sm80", "cutlass",
                     "gemm", "nhwckrsc")),
    ("batch norm", ("batch_norm", "batchnorm", "bn_", "welford")),
    ("pooling", ("pool",)),
    ("concatenation", ("cat", "concat")),
    ("optimiser", ("foreach", "multi_tensor")),
    ("reduction", ("reduce",)),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "threshold", "relu", "copy", "fill")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def profile(step, steps: int = 5) -> dict:
    """GPU kernel time per step summed by kind, the busiest kernels, and the share of the step the GPU was busy."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    kinds: dict[str, float] = collections.defaultdict(float)
    kernels: dict[str, float] = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:  # a kernel, memory copy or memset on the GPU
            seconds = e.time_range.elapsed_us() / 1e6 / steps
            kinds[kind_of(e.name)] += seconds
            kernels[e.name[:90]] += seconds
    busy = sum(kinds.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {"profile_wall_seconds_per_step": wall, "profile_gpu_busy_seconds_per_step": busy,
            "profile_seconds_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "profile_top_kernels": dict(top)}


class OpTimes(TorchDispatchMode):
    """Wall seconds of every ATen op run under it, summed by op (``convolution``, ``native_batch_norm_backward``,
    ...). On a CPU each op runs to completion on the calling thread (the backward's too), so its wall time is its
    cost; the op times of a step add up to the step's time less the Python around them."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[func.overloadpacket.__name__] += time.perf_counter() - t0
        return out


CPU_KINDS = (  # ATen op-name fragments -> kind; the first match wins
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution",)),
    ("batch norm backward", ("batch_norm_backward",)),
    ("batch norm forward", ("batch_norm",)),
    ("ReLU and its backward", ("relu", "threshold", "clamp")),
    ("pooling", ("pool",)),
    ("concatenation", ("cat",)),
    ("other element-wise (gradient sums, casts, copies, the optimiser)",
     ("add", "mul", "div", "sqrt", "clone", "copy", "fill", "zero", "_foreach")),
)


def profile_cpu(step, flops: float, peak: float, steps: int = 3) -> dict:
    """Where a CPU step's time goes: seconds per step by kind of op (:class:`OpTimes`), the busiest ops, and the
    FLOP/s the convolutions reach on their own (every FLOP ``step_flops`` counts is a convolution's) over the
    matmul ``peak``: the utilisation the step would have with no other op at all."""
    for _ in range(2):
        step()
    times = OpTimes()
    t0 = time.perf_counter()
    with times:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    ops = {name: seconds / steps for name, seconds in times.seconds.items()}
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, seconds in ops.items():
        kinds[next((kind for kind, keys in CPU_KINDS if any(k in name for k in keys)), "other")] += seconds
    conv = kinds["convolution forward"] + kinds["convolution backward"]
    return {"profile_wall_seconds_per_step": wall, "profile_op_seconds_per_step": sum(ops.values()),
            "profile_seconds_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "profile_top_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12]),
            "convolution_tflops": flops / conv / 1e12, "mfu_convolutions_alone": flops / conv / peak}


VARIANTS = ("eager", "eager_cudnn_benchmark", "graph", "compiled", "compiled_graph", "eager_release_memory",
            "eager_transposed_conv", "eager_upconv_matrix_product", "eager_relu_in_place", "eager_norm_fp32",
            "eager_compiled_optimizer", "eager_split_norm_relu")


def run(batches=(10, 20, 40), steps: int = 30, rounds: int = 2, precision: str = "bf16-mixed",
        profile_step: bool = True, variants: tuple[str, ...] | None = None) -> dict:
    dev = device()
    peak = matmul_peak(PEAK_DTYPE[precision], dev)
    variants = list(variants or (("eager", "eager_cudnn_benchmark", "graph") if dev.type == "cuda" else ("eager",)))
    out: dict = {"device": device_name(), "precision": precision, "steps": steps, "rounds": rounds}
    for b in batches:
        flops = step_flops(study_module(), dev, channels=2, batch=b)
        times, faults, system = collections.defaultdict(list), collections.defaultdict(list), collections.defaultdict(list)
        for r in range(rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                torch.backends.cudnn.benchmark = v == "eager_cudnn_benchmark"
                host_memory.reuse_freed_memory(v != "eager_release_memory")
                ReLU.in_place_on_cpu_bf16 = v == "eager_relu_in_place"
                try:
                    t0 = time.perf_counter()
                    step = study_step(b, precision, dev, graph=v.endswith("graph"), compile=v.startswith("compiled"),
                                      upconv_as_matrix_product={"eager_transposed_conv": False,
                                                                "eager_upconv_matrix_product": True}.get(v),
                                      norm_fp32=v == "eager_norm_fp32",
                                      compile_optimizer=v == "eager_compiled_optimizer",
                                      split_norm=v == "eager_split_norm_relu")
                    step()  # compiles a compiled variant
                    out.setdefault(f"first_step_seconds_{v}_b{b}", time.perf_counter() - t0)
                    seconds, step_faults, step_system = time_steps(step, steps, dev)
                    times[v].append(seconds)
                    faults[v].append(step_faults)
                    system[v].append(step_system)
                except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others' figures
                    out[f"error_{v}_b{b}"] = f"{type(e).__name__}: {e}"[:300]
                    print(f"{v} batch {b}: failed: {out[f'error_{v}_b{b}']}", flush=True)
                    break
                torch.backends.cudnn.benchmark = False
                print(f"step batch {b} {v}: {times[v][-1] * 1e3:.2f} ms, {faults[v][-1]:.0f} page faults, "
                      f"{system[v][-1]:.2f} s system time", flush=True)
        torch.backends.cudnn.benchmark = False
        host_memory.reuse_freed_memory(True)
        ReLU.in_place_on_cpu_bf16 = False
        out[f"step_gflop_b{b}"] = flops / 1e9
        for v, ts in times.items():
            out[f"step_seconds_{v}_b{b}"] = median(ts)
            out[f"page_faults_per_step_{v}_b{b}"] = median(faults[v])
            out[f"system_seconds_per_step_{v}_b{b}"] = median(system[v])
    peak = max(peak, matmul_peak(PEAK_DTYPE[precision], dev))  # best of start and end
    out["matmul_peak_tflops"] = peak / 1e12
    datasheet = datasheet_peak(device_name(), precision)  # the card's datasheet peak, a second yardstick
    for b in batches:
        for v in variants:
            if f"step_seconds_{v}_b{b}" in out:
                achieved = out[f"step_gflop_b{b}"] * 1e9 / out[f"step_seconds_{v}_b{b}"]
                out[f"mfu_{v}_b{b}"] = achieved / peak
                if datasheet:
                    out[f"mfu_datasheet_{v}_b{b}"] = achieved / datasheet
    if profile_step:
        # on a GPU the compiled step when it was timed; on a CPU the eager one (a compiled graph's kernels bypass
        # the dispatcher that OpTimes times)
        compiled = "compiled" in variants and dev.type == "cuda"
        out["profile_variant"] = "compiled" if compiled else "eager"
        step = study_step(batches[0], precision, dev, compile=compiled)
        if dev.type == "cuda":
            out |= profile(step)
        else:
            out |= profile_cpu(step, out[f"step_gflop_b{batches[0]}"] * 1e9, peak)
        print("profile (ms per step by kind): " + ", ".join(
            f"{k} {v * 1e3:.2f}" for k, v in out["profile_seconds_by_kind"].items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="10,20,40")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="bf16-mixed", choices=sorted(PEAK_DTYPE))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)}; default: those without "
                                       "compilation (eager only on a CPU)")
    args = ap.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    variants = tuple(args.variants.split(",")) if args.variants else None
    if variants and not set(variants) <= set(VARIANTS):
        ap.error(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}")
    print(json.dumps(run(batches, args.steps, args.rounds, args.precision, not args.no_profile,
                         variants), indent=2))


if __name__ == "__main__":
    main()
