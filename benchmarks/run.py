"""Run every benchmark (``make bench``) and write benchmarks/results.json.

Each benchmark runs in its own process (so thread settings and peak-memory figures do not leak between them) and
returns a flat dict; the results are merged with the machine they ran on. Never part of ``make test``.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "phantom": "from benchmarks.bench_phantom import run; r = run()",
    "data": "from benchmarks.bench_data import run; r = run()",
    "distance": "from benchmarks.bench_distance import run; r = run()",
    "detect": "from benchmarks.bench_detect import run; r = run()",
    "models": "from benchmarks.bench_models import run; r = run()",
    "train": "from benchmarks.bench_train import run; r = run()",
    "inference": "from benchmarks.bench_inference import run; r = run()",
    "precision": "from benchmarks.bench_precision import run; r = run()",
    "host_overhead": "from benchmarks.bench_overhead import run; r = run()",
    "parallel": "from benchmarks.bench_parallel import run; r = run()",
}
# the figures the performance targets are stated in (benchmarks/README.md), copied to the top level
HEADLINE = ("lightning_vs_plain_ratio", "mfu_fp32", "mfu_bf16", "bf16_speedup", "bf16_dice_difference",
            "bf16_gradient_error", "minibatch_gradient_spread",
            "data_vs_model_ratio", "data_wait_fraction", "inference_vs_monai_ratio", "inference_mfu",
            "inference_vs_monai_ratio_compiled", "inference_mfu_compiled", "peak_rss_gib",
            "seconds_per_epoch_2d", "seconds_per_epoch_multitask_bf16", "cache_first_build_seconds_per_subject",
            "cache_reload_seconds_per_subject", "phantom_seconds_per_subject", "distance_map_seconds_full_size",
            "detect_seconds_full_size", "parallel_oversubscribed_vs_shared")


def machine() -> dict:
    """The machine the figures came from (:func:`landmark_unet.runinfo.machine`: CPU and its extensions, cores,
    platform, GPU), with the versions of Python, torch, the packages and the code: two CPUs have given different
    (each deterministic) training runs of the same seed."""
    import torch

    from landmark_unet.runinfo import machine as run_machine
    from landmark_unet.runinfo import versions

    return run_machine() | {"python": platform.python_version(), "torch": torch.__version__, "versions": versions()}


def main() -> None:
    only = sys.argv[1:] or list(BENCHMARKS)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name in only:
        code = BENCHMARKS[name] + "; import json, sys; sys.stdout.write('\\nRESULT ' + json.dumps(r))"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE.parent)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            results[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
            continue
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results[name] = json.loads(line[len("RESULT "):]) | {"benchmark_seconds": time.perf_counter() - t0}
        print(f"{name}: {json.dumps(results[name], indent=2)}", flush=True)
    flat = {k: v for part in results.values() if isinstance(part, dict) for k, v in part.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    results.update({k: flat[k] for k in HEADLINE if k in flat})
    out = HERE / "results.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps(previous | results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
