"""The Python side of benchmarks/gpu_check.sh (see there for the stages).

    python benchmarks/gpu_check.py arch                        # "9.0": this GPU's capability
    python benchmarks/gpu_check.py env [--dry-run] ENV.json    # device, versions, commit
    python benchmarks/gpu_check.py build-emulation LIB.so      # csrc/cuda/ compiled for the CPU
    python benchmarks/gpu_check.py bandwidth [--dry-run] --backends triton,cuda OUT.json
    python benchmarks/gpu_check.py summary [--dry-run] SCRATCH OUT_DIR

``bandwidth`` runs each B0 block (and the dwconv_bn_silu op at each block's depthwise shape)
forward+backward once per backend with the backend's kernel-interface functions wrapped, keeps
every memory-bound call with the bytes its launches report (fused_mbconv.accounting), then
replays each call alone, timed: bytes / time is its achieved bandwidth, compared with a
device-to-device copy of a large tensor timed in the same process. Sizes, dtype and layout
come from benchmarks/cases.py's environment (FUSED_MBCONV_BENCH_*).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MB = 1e6
# docs/DESIGN.md: "Everything but the two 1x1 convs is memory-bound". The block functions that
# run a 1x1 convolution (K1, K5, B5, B1) are left out of the bandwidth table.
GEMM_FUNCTIONS = ("mbconv_expand_forward", "mbconv_project_forward", "mbconv_project_backward",
                  "mbconv_expand_backward")
OP_FUNCTIONS = ("dwconv_bn_silu_forward", "dwconv_bn_silu_backward")
DRY_RUN_NOTE = ("dry run on the CPU at tiny sizes: Triton runs in its interpreter and the "
                "CUDA kernels in their CPU emulation (csrc/cuda/ compiled as C++, loaded as the "
                "\"cpu\" backend: fused-cpu below), float16 for bfloat16; timings say nothing "
                "about a GPU")


def _run(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------- arch, env, build

def cmd_arch(args) -> int:
    import torch
    major, minor = torch.cuda.get_device_capability()
    print(f"{major}.{minor}")
    return 0


def collect_env(dry_run: bool) -> dict:
    """Device, versions, commit, and the slug the output files are named with."""
    import torch

    import fused_mbconv as fm
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    now = datetime.datetime.now(datetime.timezone.utc)
    nvcc = _run(["nvcc", "--version"]).splitlines()
    info = dict(mode="dry run" if dry_run else "gpu",
                date=now.isoformat(timespec="seconds"),
                # a copy of the tree without .git (a lent GPU machine) says it in GPU_CHECK_COMMIT
                commit=(os.environ.get("GPU_CHECK_COMMIT") or _run(["git", "rev-parse", "HEAD"])
                        or "unknown"),
                dirty=bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
                python=platform.python_version(), torch=torch.__version__,
                triton=triton_version, cuda=torch.version.cuda, nvcc=nvcc[-1] if nvcc else None,
                fused_mbconv=fm.__version__, cores=os.cpu_count(),
                host=platform.processor() or platform.machine())
    if torch.cuda.is_available() and not dry_run:
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0),
                    capability="%d.%d" % torch.cuda.get_device_capability(0),
                    sms=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1),
                    driver=_run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader"]).splitlines()[:1])
        label = info["device"]
    else:
        info.update(device=f"{os.cpu_count()}-core CPU ({info['host']})")
        label = f"dry run {os.cpu_count()}-core cpu"
    info["label"] = label
    info["slug"] = f"{_slug(label)}-{now.date().isoformat()}-gpu-check"
    return info


def cmd_env(args) -> int:
    info = collect_env(args.dry_run)
    Path(args.output).write_text(json.dumps(info, indent=1) + "\n")
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def cmd_build_emulation(args) -> int:
    from fused_mbconv import _build
    command = _build.emulation_command(str(args.output))
    print(shlex.join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


# ---------------------------------------------------------------- bandwidth

@contextlib.contextmanager
def _captured(module, names):
    """Wrap ``module``'s functions ``names``: every call is kept with its arguments and the
    launches it reported."""
    from fused_mbconv import accounting
    calls = []
    originals = {name: getattr(module, name) for name in names if hasattr(module, name)}

    def wrap(name, fn):
        def call(*args, **kwargs):
            with accounting.record_launches() as launches:
                out = fn(*args, **kwargs)
            calls.append(dict(function=name, fn=fn, args=args, kwargs=kwargs,
                              launches=list(launches)))
            return out
        return call

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def _copy_bandwidth(device, nbytes: int, warmup: int, repeats: int) -> dict:
    import torch

    from fused_mbconv import profiling
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timing = profiling.time_fn(lambda: dst.copy_(src), device, warmup, repeats)
    return dict(bytes=nbytes, moved_bytes=2 * nbytes, seconds=timing.median,
                bytes_per_s=2 * nbytes / timing.median)


def cmd_bandwidth(args) -> int:
    import torch

    import cases
    from fused_mbconv.ops.mbconv import KERNELS

    device, size = cases.device(), cases.size()
    warmup, repeats, inner = (0, 1, 1) if args.dry_run else (3, 5, 10)
    copy = _copy_bandwidth(device, (64 << 20) if args.dry_run else (1 << 30), warmup, repeats)
    print(f"copy: {copy['moved_bytes'] / MB:.0f} MB moved in {copy['seconds'] * 1e6:.0f} us: "
          f"{copy['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    block_shapes = cases.b0_block_shapes(size.resolution)
    op_shapes = cases.op_shapes(size.resolution)
    if args.dry_run:
        block_shapes, op_shapes = block_shapes[:1], op_shapes[:1]
    memory_bound = [k for k in KERNELS if k not in GEMM_FUNCTIONS] + list(OP_FUNCTIONS)
    rows, errors = [], []
    try:
        _measure_bandwidth(args, device, size, block_shapes, op_shapes, memory_bound, copy,
                           (warmup, repeats, inner), rows, errors)
    except KeyboardInterrupt:  # the time box: keep what was measured
        errors.append("interrupted (time box): the rows above are those measured before")
    Path(args.output).write_text(json.dumps(dict(
        device=str(device), size=size.name, dtype=str(cases.dtype()).replace("torch.", ""),
        channels_last=cases.memory_format() == torch.channels_last, copy=copy, rows=rows,
        errors=errors, timing=dict(warmup=warmup, repeats=repeats, calls_per_repeat=inner)),
        indent=1) + "\n")
    return 1 if errors or not rows else 0


def _measure_bandwidth(args, device, size, block_shapes, op_shapes, memory_bound, copy,
                       timing, rows, errors) -> None:
    import torch

    import cases
    import fused_mbconv as fm
    from fused_mbconv import profiling

    warmup, repeats, inner = timing
    for backend in args.backends.split(","):
        for level, shapes, workload, batch in (
                ("block", block_shapes, cases.block_workload, size.block_batch),
                ("op", op_shapes, cases.op_workload, size.op_batch)):
            for shape in shapes:
                case = shape.id if level == "block" else shape.depthwise_id
                work = None
                try:
                    with fm.use_backend(backend):
                        work = workload(shape, f"fused-{backend}", batch)
                        module = fm.backends.kernels_for(device)
                        with _captured(module, memory_bound) as calls:
                            work.backward(work.forward())
                        seen = set()
                        for call in calls:
                            kernels = "+".join(launch.kernel for launch in call["launches"])
                            moved = sum(launch.bytes_moved for launch in call["launches"])
                            if not moved or (call["function"], kernels, moved) in seen:
                                continue  # a recomputation of a call already timed
                            seen.add((call["function"], kernels, moved))
                            fn, a, kw = call["fn"], call["args"], call["kwargs"]
                            timing = profiling.time_fn(
                                lambda: [fn(*a, **kw) for _ in range(inner)], device, warmup,
                                repeats)
                            seconds = timing.median / inner
                            rows.append(dict(level=level, case=case, backend=backend,
                                             function=call["function"], kernels=kernels,
                                             launches=len(call["launches"]), bytes=moved,
                                             seconds=seconds, bytes_per_s=moved / seconds,
                                             percent_of_copy=100 * moved / seconds
                                             / copy["bytes_per_s"]))
                            print(f"{backend} {case} {kernels}: {moved / MB:.2f} MB, "
                                  f"{seconds * 1e6:.1f} us, "
                                  f"{_percent(rows[-1]['percent_of_copy'])} of copy", flush=True)
                except Exception as exc:  # reported, and the other cases still run
                    errors.append(f"{backend} {level} {case}: {type(exc).__name__}: {exc}")
                    print("ERROR", errors[-1], flush=True)
                finally:
                    del work
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


# ---------------------------------------------------------------- summary

def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def parity_results(scratch: Path, suite: str) -> dict:
    """Counts and failing test ids of one suite's shards (JUnit XML); shards that left no
    report are listed with the tail of their log."""
    result = dict(passed=0, failed=0, errors=0, skipped=0, failing=[], missing_reports=[])
    for log in sorted(scratch.glob(f"parity-{suite}-*.log")):
        xml = log.with_suffix(".xml")
        if not xml.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            result["missing_reports"].append(f"{log.stem}: {' / '.join(tail)}")
            continue
        for case in ET.parse(xml).getroot().iter("testcase"):
            test_id = (case.get("classname", "").replace(".", "/") + ".py::"
                       + case.get("name", ""))
            if case.find("failure") is not None:
                result["failed"] += 1
                result["failing"].append(test_id)
            elif case.find("error") is not None:
                result["errors"] += 1
                result["failing"].append(test_id + " (error)")
            elif case.find("skipped") is not None:
                result["skipped"] += 1
            else:
                result["passed"] += 1
    return result


def _stages(scratch: Path) -> List[dict]:
    rows = []
    for line in (scratch / "stages.tsv").read_text().splitlines():
        name, status, seconds, box = line.split("\t")
        rows.append(dict(stage=name, status=status, seconds=int(seconds), box_s=int(box)))
    return rows


def _rate(images_per_s: float) -> str:
    return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def _block_tables(records: List[dict]) -> List[str]:
    timed = [r for r in records if r.get("time_s")]
    if not timed:
        return ["No block was timed (see the log)."]
    eager = {r["case"]: r["time_s"] for r in timed if r["provider"] == "eager"}
    rows = []
    for r in timed:
        base = eager.get(r["case"])
        rows.append([r["case"], r["provider"], f"{r['time_s'] * 1e3:.3f}",
                     _rate(r["batch"] / r["time_s"]),
                     "–" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / MB:.1f}",
                     "–" if base is None else f"{base / r['time_s']:.2f}×"])
    return _table(["block", "provider", "ms", "img/s", "peak MB", "speed-up vs eager"], rows)


def _network_table(network: Optional[dict]) -> List[str]:
    if not network or not network.get("results"):
        return ["No network result (see the log)."]
    meta, results = network["meta"], network["results"]
    base = results[0]["seconds_per_step"]
    missing = [p for p in meta["providers"] if p not in {r["provider"] for r in results}]
    lines = [f"{meta['model']}, batch {meta['batch']}, {meta['resolution']}², "
             f"{meta['dtype']} parameters, AMP {meta['amp'] or 'off'}, "
             f"{'channels_last' if meta['channels_last'] else 'NCHW'}, median of "
             f"{meta['steps']} steps after {meta['warmup']} warm-up"
             + (f"; not measured (time box): {', '.join(missing)}" if missing else "") + ".",
             ""]
    rows = [[r["provider"], f"{r['seconds_per_step'] * 1e3:.1f}", _rate(r["images_per_s"]),
             "–" if r["peak_bytes"] is None else f"{r['peak_bytes'] / MB:.0f}",
             f"{r['saved_bytes'] / MB:.0f}", f"{base / r['seconds_per_step']:.2f}×"]
            for r in results]
    return lines + _table(["provider", "ms/step", "img/s", "peak MB", "saved MB",
                           "speed-up vs eager"], rows)


def _percent(value: float) -> str:
    return f"{value:.0f}%" if value >= 10 else f"{value:.2g}%"


def _bandwidth_tables(bandwidth: Optional[dict]) -> List[str]:
    if not bandwidth or not bandwidth.get("rows"):
        errors = (bandwidth or {}).get("errors") or ["no result (see the log)"]
        return [f"No bandwidth measured: {errors[0]}"]
    copy = bandwidth["copy"]
    lines = [f"Copy bandwidth {copy['bytes_per_s'] / 1e9:.1f} GB/s: a device-to-device copy of "
             f"{copy['bytes'] / 2**20:.0f} MiB (read + write), timed in the same run. Each "
             f"fused kernel's bytes are those its launcher reports (launch accounting); its "
             f"time is a replay of the same call alone (median of "
             f"{bandwidth['timing']['repeats']} x {bandwidth['timing']['calls_per_repeat']} "
             f"calls). A row `a+b` is one launcher call of two kernels, timed together. "
             f"{bandwidth['dtype']}, {'channels_last' if bandwidth['channels_last'] else 'NCHW'}"
             f", over every case of the level:", ""]
    groups: Dict[tuple, List[dict]] = {}
    for row in bandwidth["rows"]:
        groups.setdefault((row["level"], row["backend"], row["function"], row["kernels"]),
                          []).append(row)
    rows = []
    for (level, backend, function, kernels), members in groups.items():
        moved = sum(r["bytes"] for r in members)
        seconds = sum(r["seconds"] for r in members)
        percents = [r["percent_of_copy"] for r in members]
        rows.append([level, backend, function, kernels, len(members), f"{moved / MB:.1f}",
                     f"{seconds * 1e6:.1f}", f"{moved / seconds / 1e9:.1f}",
                     _percent(100 * moved / seconds / copy["bytes_per_s"]),
                     f"{_percent(min(percents))[:-1]}–{_percent(max(percents))}"])
    lines += _table(["level", "backend", "launcher", "kernel(s)", "cases", "MB", "µs", "GB/s",
                     "% of copy", "range over cases"], rows)
    if bandwidth.get("errors"):
        lines += ["", "Errors: " + "; ".join(bandwidth["errors"])]
    return lines


def geometry_lines(dry_run: bool) -> List[str]:
    """The launch-geometry table (fused_mbconv.geometry) of the Triton backend, on this
    machine's device: dry-run launches at full size, so it costs no kernel time."""
    import torch

    import fused_mbconv as fm
    from fused_mbconv import geometry

    device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    usable, reason = fm.backends.backend_status("triton", device.type)
    if not usable:
        return [f"Not recorded: the triton backend cannot run on {device.type} here ({reason})."]
    rows = geometry.launch_geometry("triton", device=device)
    return [f"Triton backend, {device.type} tensors, batches "
            f"{', '.join(map(str, geometry.GEOMETRY_BATCHES))}.", ""] + \
        geometry.geometry_markdown(rows)


def cmd_summary(args) -> int:
    import report

    scratch, out = Path(args.scratch), Path(args.out)
    env = _load(scratch / "env.json") or collect_env(args.dry_run)  # the env stage failed
    stages = _stages(scratch)
    suites = {"gpu": parity_results(scratch, "gpu"),
              "interpreter": parity_results(scratch, "interpreter")}
    block_runs = [d for d in (_load(p) for p in sorted(scratch.glob("blocks-*.json"))) if d]
    records = [r for run in block_runs for r in run["records"]]
    network, bandwidth = _load(scratch / "network.json"), _load(scratch / "bandwidth.json")
    selection = scratch / "gpu-selection.txt"
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected",
                          selection.read_text()) if selection.exists() else None

    slug = env["slug"]
    md = [f"# GPU check: {env['label']}", ""]
    if args.dry_run:
        md += [f"**{DRY_RUN_NOTE}.**", ""]
    md += [f"- device: {env.get('device')}"
           + (f", compute capability {env['capability']}, {env['sms']} SMs, "
              f"{env['memory_gb']} GB, driver {', '.join(env.get('driver') or ['?'])}"
              if env.get("capability") else ""),
           f"- host: {env.get('cores')} cores ({env.get('host')})",
           f"- versions: python {env.get('python')}, torch {env.get('torch')}, triton "
           f"{env.get('triton')}, CUDA {env.get('cuda')}, nvcc: {env.get('nvcc')}, "
           f"fused_mbconv {env.get('fused_mbconv')}",
           f"- commit `{env.get('commit')}`{' (uncommitted changes)' if env.get('dirty') else ''}"
           f", {env.get('date')}", "", "## Stages", ""]
    md += _table(["stage", "status", "seconds", "time box s"],
                 [[s["stage"], s["status"], s["seconds"], s["box_s"]] for s in stages])
    md += ["", "## Parity", ""]
    titles = {"gpu": ("GPU: CUDA tensors, compiled Triton and the cuda backend" if not args.dry_run
                      else "stand-in for the GPU suite: the emulated CUDA kernels"),
              "interpreter": "CPU tensors, Triton interpreter (TRITON_INTERPRET=1)"}
    md += _table(["suite", "passed", "failed", "errors", "skipped"],
                 [[titles[k], v["passed"], v["failed"], v["errors"], v["skipped"]]
                  for k, v in suites.items()])
    if collected:
        md += ["", f"The GPU selection collects {collected.group(1)} tests here (they run where "
                   f"a GPU is present)."]
    for name, suite in suites.items():
        if suite["failing"]:
            md += ["", f"Failing ({name}):", ""] + [f"- `{t}`" for t in suite["failing"]]
        if suite["missing_reports"]:
            md += ["", f"No report ({name}):", ""] + [f"- {t}" for t in
                                                      suite["missing_reports"]]
    meta = block_runs[0]["meta"] if block_runs else {}
    size = meta.get("size", {})
    md += ["", f"## Benchmarks: EfficientNet-B0 blocks, forward+backward, batch "
               f"{size.get('block_batch', '?')}, {meta.get('dtype', '?')}, "
               f"{'channels_last' if meta.get('channels_last') else 'NCHW'}", ""]
    md += _block_tables(records)
    md += ["", "## Benchmarks: training step", ""] + _network_table(network)
    md += ["", "## Bandwidth of the memory-bound fused kernels", ""]
    md += _bandwidth_tables(bandwidth)
    md += ["", "## Launch geometry of the B0 blocks", ""] + geometry_lines(args.dry_run)
    tables = f"`{slug}.md` and `{slug}.png` (benchmarks/report.py's block tables), " \
        if records and meta else ""
    md += ["", f"Files: `{slug}.json` (everything above, machine-readable), {tables}"
               f"`{slug}.log`."]
    text = "\n".join(md) + "\n"

    results = dict(meta=dict(meta, gpu_check=env), records=records,
                   gpu_check=dict(env=env, stages=stages, parity=suites, network=network,
                                  bandwidth=bandwidth,
                                  gpu_selection=int(collected.group(1)) if collected else None))
    results_path = out / f"{slug}.json"
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    if records and meta:
        report.write_report(results_path)
    logs = [scratch / "gpu_check.log"] + sorted(scratch.glob("parity-*.log"))
    with open(out / f"{slug}.log", "w") as f:
        for log in logs:
            if log.exists():
                f.write(f"==> {log.name} <==\n{log.read_text(errors='replace')}\n")
    (out / "summary.md").write_text(text)
    print(text)
    ran = sum(s["passed"] + s["failed"] + s["errors"] for s in suites.values())
    failed = any(s["failed"] or s["errors"] or s["missing_reports"] for s in suites.values())
    passed = all(s["status"] in ("ok", "skipped (dry run)") for s in stages)
    return 0 if passed and ran and not failed else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("arch")
    p = sub.add_parser("env")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("output")
    p = sub.add_parser("build-emulation")
    p.add_argument("output", type=Path)
    p = sub.add_parser("bandwidth")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--backends", required=True, help="comma-separated, e.g. triton,cuda")
    p.add_argument("output")
    p = sub.add_parser("summary")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("scratch")
    p.add_argument("out")
    args = parser.parse_args(argv)
    commands = {"arch": cmd_arch, "env": cmd_env, "build-emulation": cmd_build_emulation,
                "bandwidth": cmd_bandwidth, "summary": cmd_summary}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
