"""Timing and CSV output shared by the CPU benchmark scripts (run as ``python benchmarks/X.py``:
this directory is on sys.path)."""

import csv
import statistics
import time


def time_ms(providers, x, grad, reps, warmup=3):
    """{provider: (median, min) ms} of forward + backward from a fresh leaf of ``x``,
    round-robin over providers, so load changes on a shared machine hit all of them alike."""
    samples = {name: [] for name in providers}
    for i in range(warmup + reps):
        for name, fn in providers.items():
            xi = x.detach().requires_grad_()
            start = time.perf_counter()
            fn(xi).backward(grad)
            if i >= warmup:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
