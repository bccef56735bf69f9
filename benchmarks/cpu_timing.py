"""Timing and CSV output shared by the CPU benchmark scripts (run as ``python benchmarks/X.py``:
this directory is on sys.path)."""

import csv
import statistics
import sys
import time

import fused_mbconv as fm


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


def on_backend(module, backend):
    """``module`` as a provider that runs it on fused_mbconv backend ``backend``."""
    def run(x):
        with fm.use_backend(backend):
            return module(x)
    return run


def report(case, results, **columns):
    """CSV rows of one case's ``time_ms`` results, each printed as it goes, with its speedup
    over "eager" when eager ran; ``columns``: extra fields of every row."""
    base = results["eager"][0] if "eager" in results else None
    rows = []
    for provider, (median, best) in results.items():
        speedup = round(base / median, 2) if base else None
        rows.append(dict(shape=case, provider=provider, **columns, median_ms=round(median, 2),
                         min_ms=round(best, 2), speedup_vs_eager=speedup))
        print(f"{case:32s} {provider:14s} median {median:8.2f} ms  min {best:8.2f} ms"
              + (f"  x{speedup:.2f} vs eager" if speedup else ""))
    sys.stdout.flush()
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
