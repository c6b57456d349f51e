"""Distance-map benchmark: seconds for one 256 x 256 x 252 map of the two hip joints (target <= 0.1 s), per
encoding, best of 5.

    python -m benchmarks.bench_distance
"""

from __future__ import annotations

import json
import time

import numpy as np

from landmark_unet.landmarks import distance_map

SHAPE = (256, 256, 252)
SPACING = (1.875, 1.875, 4.0)
HIPS = np.array([[79.6, 121.3, 80.2], [176.4, 122.0, 80.9]])


def run(repeats: int = 5) -> dict:
    out = {}
    for metric, spacing in (("manhattan", None), ("euclidean", SPACING), ("gaussian", SPACING)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            distance_map(SHAPE, HIPS, metric=metric, spacing=spacing, sigma_mm=40)
            times.append(time.perf_counter() - t0)
        out[f"distance_map_seconds_{metric}"] = min(times)
    out["distance_map_seconds_full_size"] = out["distance_map_seconds_manhattan"]
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
