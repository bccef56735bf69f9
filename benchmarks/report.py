"""Results JSON -> Markdown table of ratios against eager, and a PNG plot.

    python benchmarks/report.py benchmarks/results/<run>.json   # writes <run>.md and <run>.png

Ratios are eager / provider, so > 1 always means better than eager: faster, fewer bytes saved
for backward, less (modeled) device-memory traffic.
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

LEVELS = (("op", "dwconv + BN + SiLU"), ("block", "EfficientNet-B0 blocks"),
          ("network", "efficientnet_b0 training step"))
MB = 1e6


def _providers(records) -> List[str]:
    names = list(OrderedDict.fromkeys(r["provider"] for r in records))
    return sorted(names, key=lambda p: (p != "eager", p != "compile", p))


def _index(records) -> Dict[Tuple[str, str, str, str], dict]:
    return {(r["level"], r["case"], r["mode"], r["provider"]): r for r in records}


def _ratio(eager: Optional[float], other: Optional[float]) -> Optional[float]:
    if eager is None or other is None or other == 0:
        return None
    return eager / other


def _fmt_ratio(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _rows(records, level):
    return list(OrderedDict.fromkeys((r["case"], r["mode"]) for r in records
                                     if r["level"] == level))


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(results: dict) -> str:
    meta, records = results["meta"], results["records"]
    index, providers = _index(records), _providers(records)
    others = [p for p in providers if p != "eager"]
    out = [f"# Benchmarks: {meta['label']}", "",
           f"device `{meta['device']}` ({meta['device_name']}), torch {meta['torch']}, "
           f"triton {meta['triton']}, commit `{meta['commit'][:12]}`, {meta['date']}, "
           f"size preset `{meta['size']['name']}`, {meta.get('dtype', 'float32')}, "
           f"{'channels_last' if meta.get('channels_last') else 'NCHW'}, "
           f"{meta.get('torch_threads')} CPU thread(s); "
           f"fused backends here: "
           f"{', '.join(meta['backends']) or 'none'}; compile: {meta['compile']}.", "",
           "Ratios are eager / provider: > 1 is better than eager. Time is measured on this "
           "machine; traffic is counted (aten ops and reported kernel launches) and its time "
           f"is **modeled** at {meta['modeled_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, not "
           "measured.", ""]
    missing = [name for name, label in LEVELS if not any(r["level"] == name for r in records)]
    for level, title in LEVELS:
        rows = _rows(records, level)
        if not rows:
            continue
        level_providers = [p for p in others if any(r["level"] == level and r["provider"] == p
                                                    for r in records)]
        out += [f"## {title}", ""]
        if not any(p.startswith("fused-") for p in level_providers):
            out += ["No fused provider at this level in this run (the fused path was not "
                    "available).", ""]
        # Time.
        body = []
        for case, mode in rows:
            eager = index.get((level, case, mode, "eager"), {})
            cells = [case, mode, "–" if eager.get("time_s") is None
                     else f"{eager['time_s'] * 1e3:.2f}"]
            for p in level_providers:
                other = index.get((level, case, mode, p), {})
                cells.append(_fmt_ratio(_ratio(eager.get("time_s"), other.get("time_s"))))
            if level == "network":
                cells.append(" / ".join(
                    f"{p} {index[(level, case, mode, p)]['images_per_s']:.1f}"
                    for p in providers if index.get((level, case, mode, p), {}).get(
                        "images_per_s")))
            body.append(cells)
        header = ["case", "mode", "eager ms"] + [f"{p} speed-up" for p in level_providers]
        if level == "network":
            header.append("images/s")
        out += ["Measured time (median):", ""] + _table(header, body) + [""]
        # Saved for backward.
        body = []
        for case, mode in rows:
            eager = index.get((level, case, mode, "eager"), {})
            if eager.get("saved_bytes") is None:
                continue
            cells = [case, f"{eager['saved_bytes'] / MB:.2f}"]
            for p in level_providers:
                other = index.get((level, case, mode, p), {})
                saved = other.get("saved_bytes")
                ratio = _fmt_ratio(_ratio(eager["saved_bytes"], saved))
                cells.append("–" if saved is None else f"{saved / MB:.2f} ({ratio})")
            body.append(cells)
        if body:
            out += ["Saved for backward (MB, excluding the input and parameters; ratio fewer):",
                    ""] + _table(["case", "eager MB"] + [f"{p} MB" for p in level_providers],
                                 body) + [""]
        # Launches and traffic.
        body = []
        for case, mode in rows:
            if mode not in ("forward+backward", "step"):
                continue
            eager = index.get((level, case, mode, "eager"), {})
            if eager.get("bytes_read") is None:
                continue
            eager_bytes = eager["bytes_read"] + eager["bytes_written"]
            cells = [case, mode, str(eager["launches"]), f"{eager_bytes / MB:.1f}",
                     f"{eager['modeled_s'] * 1e6:.1f}"]
            for p in level_providers:
                other = index.get((level, case, mode, p), {})
                if other.get("bytes_read") is None:
                    cells.append("not counted" if p == "compile" else "–")
                    continue
                moved = other["bytes_read"] + other["bytes_written"]
                cells.append(f"{other['launches']} / {moved / MB:.1f} MB "
                             f"({_fmt_ratio(_ratio(eager_bytes, moved))})")
            body.append(cells)
        if body:
            out += ["Launches and device-memory traffic per forward+backward (modeled µs at "
                    "H100 bandwidth):", ""] + _table(
                ["case", "mode", "eager launches", "eager MB", "eager modeled µs"]
                + [f"{p} launches / MB (ratio)" for p in level_providers], body) + [""]
        peaks = [(case, mode) for case, mode in rows
                 if index.get((level, case, mode, "eager"), {}).get("peak_bytes")]
        if peaks:
            body = [[case, mode] + [
                "–" if not index.get((level, case, mode, p), {}).get("peak_bytes") else
                f"{index[(level, case, mode, p)]['peak_bytes'] / MB:.1f}" for p in providers]
                for case, mode in peaks]
            out += ["Peak device memory (MB above the inputs):", ""] + _table(
                ["case", "mode"] + providers, body) + [""]
    if missing:
        out += [f"Levels not in this run: {', '.join(missing)}.", ""]
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["records"]
    index, providers = _index(records), _providers(records)
    others = [p for p in providers if p != "eager"]
    panels = [("measured speed-up vs eager (forward+backward)", "time_s",
               ("forward+backward", "step")),
              ("saved-for-backward bytes, eager / provider", "saved_bytes", ("forward", "step")),
              ("modeled traffic, eager / provider (fwd+bwd)", "traffic",
               ("forward+backward", "step"))]
    cases = list(OrderedDict.fromkeys((r["level"], r["case"]) for r in records))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.55 * len(cases) + 3), 11))
    width = 0.8 / max(1, len(others))

    def value(record, key):
        if record is None:
            return None
        if key == "traffic":
            return None if record.get("bytes_read") is None else \
                record["bytes_read"] + record["bytes_written"]
        return record.get(key)

    for ax, (title, key, modes) in zip(axes, panels):
        for i, p in enumerate(others):
            xs, ys = [], []
            for j, (level, case) in enumerate(cases):
                mode = next((m for m in modes if (level, case, m, "eager") in index), None)
                if mode is None:
                    continue
                r = _ratio(value(index.get((level, case, mode, "eager")), key),
                           value(index.get((level, case, mode, p)), key))
                if r is not None:
                    xs.append(j + (i - (len(others) - 1) / 2) * width)
                    ys.append(r)
            ax.bar(xs, ys, width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{level}: {case}" for level, case in cases], rotation=60,
                           ha="right", fontsize=7)
        if others:
            ax.legend(fontsize=8)
    fig.suptitle(f"fused_mbconv benchmarks, {results['meta']['label']} "
                 f"(ratios > 1 beat eager)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results_path) -> Tuple[Path, Path]:
    results_path = Path(results_path)
    results = json.loads(results_path.read_text())
    md_path, png_path = results_path.with_suffix(".md"), results_path.with_suffix(".png")
    md_path.write_text(markdown(results) + "\n")
    plot(results, png_path)
    return md_path, png_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results JSON file(s)")
    for path in parser.parse_args(argv).results:
        md_path, png_path = write_report(path)
        print(f"{md_path}\n{png_path}")


if __name__ == "__main__":
    main()
