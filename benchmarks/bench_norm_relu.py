"""What BatchNorm + ReLU costs in a bf16 CPU training step, and what fusing them would buy.

    python -m benchmarks.bench_norm_relu [--shape 10,64,256,256] [--reps 8] [--rounds 2]

One training-mode BatchNorm followed by a ReLU on a channels-last bf16 activation (by default the study network's
largest: batch 10, 64 channels, 256 x 256), forward and backward, timed as:

- ``eager``: PyTorch's kernels, as the training step runs them (``F.batch_norm``, then a ReLU that writes a new
  tensor, as :class:`landmark_unet.models.blocks.ReLU` does on a CPU in bf16);
- ``compiled``: the same two calls through ``torch.compile`` (Inductor's own decomposition of BatchNorm);
- ``split``: :class:`SplitNormReLU`, BatchNorm and ReLU as one autograd function of four loops compiled by Inductor
  (forward: the batch statistics, then normalise-and-clamp; backward: two sums, then the input gradient), each
  reading the activation once, with the per-channel arithmetic done outside the loops;
- ``copy``: a clone of the activation, the memory-bandwidth yardstick (its read + write bytes over its time).

Prints and returns the median forward and backward milliseconds of each, the relative errors of the output and
the gradients against an fp64 reference, and the bytes a fused forward and backward must move at the copy's rate
(three and five passes over the activation). ``bench_step --variants eager,eager_split_norm_relu`` puts
:class:`SplitNormReLU` into the whole study step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import device_name, median
from landmark_unet import host_memory


def _statistics(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sums of (x - shift) and of its square over the rows of x (M, C), in fp32."""
    d = x.float() - shift
    return d.sum(0), (d * d).sum(0)


def _normalise_relu(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return torch.relu(x.float() * scale + offset).to(x.dtype)


def _gradient_sums(g: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                   offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sums of the ReLU-masked output gradient and of its product with x."""
    xf = x.float()
    gm = torch.where(xf * scale + offset > 0, g.float(), 0.0)
    return gm.sum(0), (gm * xf).sum(0)


def _input_gradient(g: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    k_x: torch.Tensor, k_1: torch.Tensor) -> torch.Tensor:
    """scale * masked g + k_x * x + k_1, per channel: BatchNorm's input gradient, rearranged."""
    xf = x.float()
    gm = torch.where(xf * scale + offset > 0, g.float(), 0.0)
    return (gm * scale + xf * k_x + k_1).to(x.dtype)


_KERNELS: dict = {}


def _kernel(fn):
    """``fn`` compiled by Inductor, once per process (static shapes: one compilation per channel count and rows)."""
    if fn not in _KERNELS:
        _KERNELS[fn] = torch.compile(fn, dynamic=False)
    return _KERNELS[fn]


class SplitNormReLU(torch.autograd.Function):
    """relu(batch_norm(x)) in training mode for a channels-last x (N, C, H, W), weight and bias (C,) fp32; returns
    (N, C, H, W) in x's dtype, and the batch mean and biased variance (C,) fp32. Saves x only (the ReLU's mask is
    recomputed from it). The variance is taken about the first row's values (no cancellation when the mean is
    large)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view of a channels-last tensor: (N H W, C)
        shift = rows[0].float()
        s1, s2 = _kernel(_statistics)(rows, shift)
        m = rows.shape[0]
        mean_shifted = s1 / m
        var = (s2 / m - mean_shifted * mean_shifted).clamp_min(0)
        mean = mean_shifted + shift
        rstd = torch.rsqrt(var + eps)
        scale = weight * rstd
        offset = bias - mean * scale
        y = _kernel(_normalise_relu)(rows, scale, offset)
        ctx.save_for_backward(x, weight, mean, rstd, scale, offset)
        ctx.mark_non_differentiable(mean, var)
        return y.view(n, h, w, c).permute(0, 3, 1, 2), mean, var

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _mean, _var):
        x, weight, mean, rstd, scale, offset = ctx.saved_tensors
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        g = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, c)
        m = rows.shape[0]
        sum_g, sum_gx = _kernel(_gradient_sums)(g, rows, scale, offset)
        sum_g_xhat = (sum_gx - mean * sum_g) * rstd  # the weight's gradient
        # dx = scale * (g - sum_g / m - xhat * sum_g_xhat / m) with xhat = (x - mean) * rstd, i.e.
        # scale * g + k_x * x + k_1
        k_x = -scale * rstd * sum_g_xhat / m
        k_1 = -scale * sum_g / m - mean * k_x
        dx = _kernel(_input_gradient)(g, rows, scale, offset, k_x, k_1)
        return dx.view(n, h, w, c).permute(0, 3, 1, 2), sum_g_xhat, sum_g, None


class SplitBatchNormReLU(nn.Module):
    """A ``nn.BatchNorm2d`` and the ReLU after it, trained through :class:`SplitNormReLU` (running statistics
    updated as BatchNorm2d does: unbiased variance, its momentum); in eval mode the plain BatchNorm2d and ReLU."""

    def __init__(self, norm: nn.BatchNorm2d):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.dtype == torch.float64:
            return F.relu(self.norm(x))
        norm = self.norm
        y, mean, var = SplitNormReLU.apply(x.contiguous(memory_format=torch.channels_last), norm.weight, norm.bias,
                                           norm.eps)
        with torch.no_grad():
            count = x.numel() // x.shape[1]
            norm.running_mean.lerp_(mean, norm.momentum)
            norm.running_var.lerp_(var * count / max(count - 1, 1), norm.momentum)
            norm.num_batches_tracked += 1
        return y


def split_norm_relu(net: nn.Module) -> int:
    """Replace every (BatchNorm2d, ReLU) pair of ``net``'s ``nn.Sequential`` blocks by :class:`SplitBatchNormReLU`
    and an identity; returns how many."""
    from landmark_unet.models.blocks import ReLU

    count = 0
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.BatchNorm2d) and isinstance(seq[i + 1], (nn.ReLU, ReLU)):
                seq[i], seq[i + 1] = SplitBatchNormReLU(seq[i]), nn.Identity()
                count += 1
    return count


def _eager(x, weight, bias):
    from landmark_unet.models.blocks import ReLU

    return ReLU()(F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5))


def _split(x, weight, bias):
    return SplitNormReLU.apply(x, weight, bias, 1e-5)[0]


def run(shape=(10, 64, 256, 256), reps: int = 8, rounds: int = 2) -> dict:
    host_memory.reuse_freed_memory(True)  # as training runs
    torch.manual_seed(0)
    n, c, h, w = shape
    x = (torch.randn(shape) * 3 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(c) + 0.5).requires_grad_()
    bias = (torch.randn(c) * 0.1).requires_grad_()
    arms = {"eager": _eager, "compiled": torch.compile(_eager), "split": _split}

    def grads(f, xx):
        weight.grad = bias.grad = None
        xx = xx.detach().requires_grad_()
        y = f(xx, weight.to(xx.dtype) if xx.dtype == torch.float64 else weight,
              bias.to(xx.dtype) if xx.dtype == torch.float64 else bias)
        y.backward(g.to(y.dtype))
        return [t.double() for t in (y.detach(), xx.grad, weight.grad, bias.grad)]

    out: dict = {"device": device_name(), "shape": list(shape), "threads": torch.get_num_threads()}
    reference = grads(_eager, x.double())
    for name, f in arms.items():
        errors = [float((a - r).norm() / r.norm()) for a, r in zip(grads(f, x), reference)]
        out[f"relative_error_{name}"] = dict(zip(("output", "input_grad", "weight_grad", "bias_grad"), errors))

    times: dict[str, list] = {name: [] for name in [*arms, "copy"]}
    for r in range(rounds):
        for name in (list(times) if r % 2 == 0 else list(times)[::-1]):
            for i in range(reps + 2):
                xx = x.detach().requires_grad_()
                t0 = time.perf_counter()
                y = xx.clone() if name == "copy" else arms[name](xx, weight, bias)
                t1 = time.perf_counter()
                if name != "copy":
                    y.backward(g)
                t2 = time.perf_counter()
                if i >= 2:
                    times[name].append((t1 - t0, t2 - t1))
    for name, ts in times.items():
        out[f"forward_ms_{name}"] = median([t[0] for t in ts]) * 1e3
        if name != "copy":
            out[f"backward_ms_{name}"] = median([t[1] for t in ts]) * 1e3
        print(f"{name}: forward {out[f'forward_ms_{name}']:.1f} ms"
              + (f", backward {out[f'backward_ms_{name}']:.1f} ms" if name != "copy" else ""), flush=True)
    nbytes = x.numel() * x.element_size()
    rate = 2 * nbytes / (out["forward_ms_copy"] / 1e3)  # read + write
    out["copy_gb_per_s"] = rate / 1e9
    out["fused_floor_ms"] = {"forward": 3 * nbytes / rate * 1e3, "backward": 5 * nbytes / rate * 1e3}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="10,64,256,256", help="N,C,H,W of the bf16 activation")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps(run(tuple(int(v) for v in args.shape.split(",")), args.reps, args.rounds), indent=2))


if __name__ == "__main__":
    main()
