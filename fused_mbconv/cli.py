"""``fused-mbconv``: info, verify, bench, train and geometry from the command line.

Exit status: 0 success, 1 a failed check or a model with no block to fuse, 2 bad arguments
(unknown model, missing optional package).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import sys
import time
from typing import List, NamedTuple, Optional, Union

import torch

import fused_mbconv as fm

from . import digits, profiling, synthetic, verification
from .backends import BACKENDS, DEVICE_TYPES, TABLE, backend_status, machine_device_types

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class UsageError(Exception):
    """Bad arguments: exit status 2."""


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    return device


def _progress(total: int, description: str):
    """A tqdm bar when tqdm is installed (optional), else nothing."""
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=description, leave=False, file=sys.stderr)


def _print_table(header: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


# ---------------------------------------------------------------- info

def cmd_info(args) -> int:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fused_mbconv {fm.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {triton_version}, CUDA {torch.version.cuda or 'none (CPU build)'}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}"
                    for i in range(torch.cuda.device_count())]
    print(f"devices: {', '.join(devices)}")
    from . import extension  # loads the compiled library: only here, not at import
    capability = extension.cpu_capability()
    if capability is not None:
        print(f"CPU capability: {capability} (this CPU runs "
              f"{', '.join(extension.cpu_capabilities())}; "
              f"FUSED_MBCONV_CPU_CAPABILITY chooses another)")
    rows = []
    for backend in TABLE:
        for device_type in filter(backend.runs, DEVICE_TYPES):
            usable, reason = backend_status(backend.name, device_type)
            if device_type not in machine_device_types():
                usable, reason = False, f"no {device_type.upper()} device"
            rows.append([backend.name, device_type, "yes" if usable else "no", reason])
    print("backends:")
    _print_table(["backend", "device", "usable", "why"], rows)
    return 0


# ---------------------------------------------------------------- report

def cmd_report(args) -> int:
    """convert_report of the converted model: which blocks, stems and heads fused, and why the
    others did not; exit 1 (FusedPathUnavailable) when nothing fused."""
    fused = verification.convert(verification.build_model(args.model))
    print(f"{args.model}: fm.convert(model)")
    print(fm.convert_report(fused))
    return 0


# ---------------------------------------------------------------- verify

def cmd_verify(args) -> int:
    device = _device(args.device)
    fused, checks = verification.verify(args.model, args.batch, args.resolution,
                                        DTYPES[args.dtype], str(device), args.seed)
    print(f"verify {args.model}: batch {args.batch}, {args.resolution}x{args.resolution}, "
          f"{args.dtype}, {device}, fused backend "
          f"{fm.backends.resolve_backend(device)}; "
          f"{len(verification.fused_modules(fused))} fused modules; dropout and stochastic "
          f"depth off")
    print(f"rule: fused error <= F x eager {args.dtype} error + atol x max(1, |ref|), errors "
          f"against a float64 eager copy; F = 2 for outputs and statistics, "
          f"{verification.GRADIENT_FACTOR:g} for gradients through the whole network")
    rows = [[c.name, f"{c.fused_error:.2e}", f"{c.eager_error:.2e}", f"{c.bound:.2e}",
             "-" if math.isnan(c.relative_error) else f"{c.relative_error:.2e}",
             "pass" if c.passed else "FAIL", c.detail]
            for c in checks]
    _print_table(["check", "fused err", "eager err", "bound", "rel err", "result", ""], rows)
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    return 1 if failed else 0


# ---------------------------------------------------------------- bench

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# --recompute's values: FusedMBConv.recompute's levels as Python spells them.
RECOMPUTE_CHOICES = {"False": False, "dwconv": "dwconv", "True": True}


class Provider(NamedTuple):
    """One model ``bench`` runs: eager (backend None), a fused backend at a recompute level,
    or torch.compile of the eager model."""
    name: str
    backend: Optional[str] = None
    recompute: Union[bool, str] = fm.DEFAULT_RECOMPUTE


def _fused_provider(backend: str, recompute: Union[bool, str]) -> Provider:
    suffix = "" if recompute == fm.DEFAULT_RECOMPUTE else f"-recompute={recompute}"
    return Provider(f"fused-{backend}{suffix}", backend, recompute)


def _bench_providers(args, device) -> List[Provider]:
    """eager, the fused backends (each at every --recompute level), then torch.compile
    (slowest to warm up: last, so that an interrupted run has already measured the
    others)."""
    backends = args.backend or verification.timed_block_backends(device)
    for backend in backends:
        usable, reason = backend_status(backend, device.type)
        if not usable:
            raise UsageError(f"--backend {backend}: not usable on {device.type} ({reason})")
        if backend not in verification.block_backends(device):
            raise UsageError(f"--backend {backend}: does not implement the fused block's "
                             f"kernels yet")
    levels = [RECOMPUTE_CHOICES[level]
              for level in dict.fromkeys(args.recompute or [str(fm.DEFAULT_RECOMPUTE)])]
    providers = [Provider("eager")] + [_fused_provider(b, level)
                                       for b in dict.fromkeys(backends) for level in levels]
    usable, reason = profiling.compile_status()
    if args.no_compile:
        pass
    elif usable:
        providers.append(Provider("compile"))
    else:
        print(f"compile: skipped ({reason})")
    return providers


def _bench_settings(args, device) -> dict:
    """What cmd_bench runs, with the CUDA / CPU defaults filled in; UsageError for a
    combination that means nothing."""
    cuda = device.type == "cuda"
    settings = dict(batch=args.batch or (256 if cuda else 8),
                    resolution=args.resolution or (224 if cuda else 128),
                    steps=args.steps or (20 if cuda else 5),
                    warmup=args.warmup if args.warmup is not None else (5 if cuda else 2),
                    dtype=args.dtype, amp=AMP_DTYPES[args.amp] if args.amp else None,
                    channels_last=args.channels_last)
    if settings["amp"] is not None and args.dtype != "float32":
        raise UsageError(f"--amp {args.amp} runs float32 parameters under autocast; got "
                         f"--dtype {args.dtype} (drop one of them)")
    return settings


def _describe(settings: dict) -> str:
    amp = settings["amp"]
    return (f"{settings['dtype']} parameters and inputs, "
            f"{'AMP ' + DTYPE_NAMES[amp] if amp else 'no AMP'}, "
            f"{'channels_last' if settings['channels_last'] else 'NCHW'}")


def cmd_bench(args) -> int:
    device = _device(args.device)
    settings = _bench_settings(args, device)
    batch, resolution = settings["batch"], settings["resolution"]
    steps, warmup = settings["steps"], settings["warmup"]
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    torch.manual_seed(args.seed)
    eager = verification.build_model(args.model).to(device, DTYPES[settings["dtype"]],
                                                    memory_format=memory_format)
    providers = _bench_providers(args, device)
    fused_models = {p.recompute: verification.convert(eager, p.recompute)
                    for p in providers if p.backend}
    names = [p.name for p in providers]
    what = ("saved activations of one forward and loss (no timing)" if args.saved_only
            else f"{warmup} warm-up + {steps} timed steps each"
            + (", one step of each provider in turn" if args.interleave else ""))
    print(f"bench {args.model}: training step (forward, loss, backward, SGD) at batch {batch}, "
          f"{resolution}x{resolution}, {device}, {_describe(settings)}; {what}; providers "
          f"{', '.join(names)}")
    meta = dict(model=args.model, device=str(device), batch=batch, resolution=resolution,
                steps=steps, warmup=warmup, dtype=settings["dtype"],
                amp=DTYPE_NAMES[settings["amp"]] if settings["amp"] else None,
                channels_last=settings["channels_last"], providers=names,
                saved_only=args.saved_only, interleave=args.interleave,
                torch=torch.__version__, fused_mbconv=fm.__version__)

    def build(provider: Provider) -> profiling.TrainStep:
        model = copy.deepcopy(fused_models[provider.recompute] if provider.backend else eager)
        if provider.name == "compile":
            model = torch.compile(model)
        with fm.use_backend(provider.backend):
            return profiling.TrainStep.build(model, batch, resolution, num_classes=1000,
                                             seed=args.seed, dtype=DTYPES[settings["dtype"]],
                                             memory_format=memory_format,
                                             autocast=settings["amp"])

    results = []
    progress = contextlib.nullcontext(None) if args.saved_only else \
        _progress(len(providers) * (warmup + steps), "bench")
    with progress as bar:
        update = bar.update if bar else None
        built, timings = {}, {}
        if args.interleave and not args.saved_only:
            built = {p.name: build(p) for p in providers}
            timings = _time_in_turn(providers, built, device, warmup, steps, update)
        for provider in providers:
            step = built.get(provider.name) or build(provider)
            with fm.use_backend(provider.backend):
                result = dict(provider=provider.name)
                if not args.saved_only:
                    timing = timings.get(provider.name) or profiling.time_fn(
                        step, device, warmup, steps, progress=update)
                    result.update(seconds_per_step=timing.median, seconds_min=timing.min,
                                  images_per_s=batch / timing.median)
                result["saved_bytes"] = profiling.saved_bytes(
                    step.loss, step.activation_exclusions()).bytes
                if not args.saved_only:
                    result["peak_bytes"] = profiling.peak_memory(step, device)
            results.append(result)
            if args.json:  # after every provider: an interrupted run keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"meta": meta, "results": results}, f, indent=1)
    _print_bench_table(results, steps, args.saved_only)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _time_in_turn(providers: List[Provider], steps_of: dict, device, warmup: int, steps: int,
                  progress) -> dict:
    """{provider name: Timing}: one step of each provider in turn, warm-up rounds first, so
    that the load of a shared machine changes for all of them alike."""
    samples = {p.name: [] for p in providers}
    for round_index in range(warmup + steps):
        for provider in providers:
            with fm.use_backend(provider.backend):
                timing = profiling.time_fn(steps_of[provider.name], device, 0, 1,
                                           progress=progress)
            if round_index >= warmup:
                samples[provider.name] += timing.samples
    return {name: profiling.Timing(s) for name, s in samples.items()}


def _print_bench_table(results: List[dict], steps: int, saved_only: bool) -> None:
    """Each provider against eager (the first): > 1x is faster, or fewer bytes saved."""
    base = results[0]

    def saved(r):
        return [f"{r['saved_bytes'] / 1e6:.1f}", f"{base['saved_bytes'] / r['saved_bytes']:.2f}x"]

    if saved_only:
        _print_table(["provider", "saved MB", "fewer saved"],
                     [[r["provider"], *saved(r)] for r in results])
        print("(saved = activations kept for backward, excluding input and parameters)")
        return
    rows = [[r["provider"], f"{r['seconds_per_step'] * 1e3:.1f}",
             f"{r['seconds_min'] * 1e3:.1f}", f"{r['images_per_s']:.1f}",
             f"{base['seconds_per_step'] / r['seconds_per_step']:.2f}x",
             f"{base['seconds_min'] / r['seconds_min']:.2f}x", *saved(r),
             "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 1e6:.1f}"]
            for r in results]
    _print_table(["provider", "ms/step", "min ms", "images/s", "speed-up", "min speed-up",
                  "saved MB", "fewer saved", "peak MB"], rows)
    print(f"(ms/step and speed-up: median of {steps} steps on this machine, min: the fastest "
          f"step; saved = activations kept for backward, excluding input and parameters; peak "
          f"memory on CUDA only)")


# ---------------------------------------------------------------- train

# The demo's optimizer: AdamW with warmup + cosine and clipped gradients learns the digits in
# ~150 steps without the loss spikes that let rounding differences grow between two runs.
WARMUP = 0.2
WEIGHT_DECAY = 0.05
CLIP_NORM = 1.0


def _training_data(args):
    """(description, classes, training batches, held-out (images, labels)) for --data."""
    generator = torch.Generator().manual_seed(args.seed)
    if args.data == "digits":
        split = digits.load(args.resolution, args.seed)
        return (f"scikit-learn's handwritten digits ({len(split.train_labels)} training, "
                f"{len(split.val_labels)} held-out images, 8x8 upsampled)", len(digits.CLASSES),
                split.batches(args.batch, args.steps, generator),
                (split.val_images, split.val_labels))
    batches = (synthetic.shapes_batch(args.batch, args.resolution, generator)
               for _ in range(args.steps))
    held_out = synthetic.shapes_batch(4 * args.batch, args.resolution,
                                      torch.Generator().manual_seed(args.seed + 1))
    return (f"synthetic shapes ({len(synthetic.CLASSES)} classes)", len(synthetic.CLASSES),
            batches, held_out)


def _warmup_cosine(steps: int, warmup: float):
    """Learning-rate factor per step: linear warmup over the first ``warmup`` of the steps,
    then a cosine decay to zero."""
    warm = max(1, int(round(warmup * steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
    return factor


def cmd_train(args) -> int:
    device = _device(args.device)
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib")
    what, classes, batches, (val_images, val_labels) = _training_data(args)
    torch.manual_seed(args.seed)
    eager = verification.disable_stochastic(
        verification.build_model(args.model, num_classes=classes))
    # The classifier starts at zero in both models: the first steps begin at chance-level
    # logits instead of large random ones, so training is stable enough for rounding
    # differences between the two not to grow into different runs.
    head = [m for m in eager.modules() if isinstance(m, torch.nn.Linear)][-1:]
    for linear in head:
        torch.nn.init.zeros_(linear.weight)
        if linear.bias is not None:
            torch.nn.init.zeros_(linear.bias)
    eager = eager.to(device)
    fused = verification.convert(eager)
    models = {"eager": eager, "fused": fused}
    schedule = _warmup_cosine(args.steps, WARMUP)
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
                  for k, m in models.items()}
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, schedule)
                  for k, o in optimizers.items()}
    losses = {k: [] for k in models}
    seconds = {k: 0.0 for k in models}
    print(f"train {args.model} on {what}, seed {args.seed}: {args.steps} AdamW steps (lr "
          f"{args.lr:g}, {WARMUP:.0%} warmup then cosine, gradients clipped to norm "
          f"{CLIP_NORM:g}), batch {args.batch}, {args.resolution}x{args.resolution}, {device}; "
          f"eager and fused from the same weights and batches")
    with _progress(args.steps, "train") as bar:
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            for name, model in models.items():
                start = time.perf_counter()
                model.train()
                optimizers[name].zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
                optimizers[name].step()
                schedulers[name].step()
                losses[name].append(loss.item())  # .item() waits for the device
                seconds[name] += time.perf_counter() - start
            if bar is not None:
                bar.update()
    accuracy = {}
    with torch.no_grad():
        for name, model in models.items():
            predicted = model.eval()(val_images.to(device)).argmax(1).cpu()
            accuracy[name] = (predicted == val_labels).float().mean().item()
    diffs = [abs(a - b) for a, b in zip(losses["eager"], losses["fused"])]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    for name in models:
        print(f"{name}: loss {losses[name][0]:.4f} -> {losses[name][-1]:.4f}, "
              f"{args.steps / seconds[name]:.2f} steps/s, held-out accuracy "
              f"{accuracy[name]:.1%} of {len(val_labels)}")
    print(f"largest loss difference eager vs fused: {diffs[worst]:.3e} at step {worst + 1}, "
          f"{diffs[worst] / losses['eager'][0]:.2%} of the starting loss "
          f"({diffs[worst] / losses['eager'][worst]:.2%} of that step's loss)")
    if args.plot:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in models:
            ax.plot(range(1, args.steps + 1), losses[name], label=name,
                    linestyle="-" if name == "eager" else "--")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(f"{args.model} on {args.data}: eager vs fused "
                     f"(max |diff| {diffs[worst]:.2e})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        plt.close(fig)
        print(f"wrote {args.plot}")
    finite = all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    if not finite:
        print("FAIL: non-finite loss")
    return 0 if finite else 1


# ---------------------------------------------------------------- geometry

def cmd_geometry(args) -> int:
    """The launch-geometry table of fused_mbconv.geometry; exit 1 when a launch breaks the
    occupancy rule."""
    from . import geometry

    device = _device(args.device)
    usable, reason = backend_status(args.backend, device.type)
    if not usable:
        raise UsageError(f"--backend {args.backend} cannot run on {device.type}: {reason}")
    rows = geometry.launch_geometry(args.backend, batches=tuple(args.batch), device=device)
    print(f"launch geometry of the EfficientNet-B0 blocks, backend {args.backend}, "
          f"{device.type} tensors, batches {', '.join(map(str, args.batch))}")
    print("\n".join(geometry.geometry_markdown(rows)))
    return 0 if all(row.fills_gpu for row in rows) else 1


# ---------------------------------------------------------------- entry point

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-mbconv",
        description="Fused MBConv kernels: environment info, verification against eager "
                    "PyTorch, benchmarks and a short training run.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, backends built and usable")
    model_help = ("efficientnet_b0..efficientnet_b7, timm:NAME, torchvision:NAME or hf:NAME "
                  f"(hf: {', '.join(verification.HF_MODELS)}; random weights, nothing "
                  f"downloaded)")

    p = sub.add_parser("report", help="convert MODEL; list each block, stem and head: fused "
                                      "or why not")
    p.add_argument("model", help=model_help)

    p = sub.add_parser("verify", help="convert MODEL, compare with eager; exit 1 on mismatch")
    p.add_argument("model", help=model_help)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("bench", help="eager vs torch.compile vs fused training step")
    p.add_argument("model", help=model_help)
    p.add_argument("--batch", type=int, help="default 256 on CUDA, 8 on CPU")
    p.add_argument("--resolution", type=int, help="default 224 on CUDA, 128 on CPU")
    p.add_argument("--steps", type=int, help="timed steps (default 20 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps (default 5 on CUDA, 2 on CPU)")
    p.add_argument("--backend", choices=BACKENDS, action="append",
                   help="only this fused backend (repeat for several)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--recompute", choices=list(RECOMPUTE_CHOICES), action="append",
                   help="what the fused blocks keep for backward (FusedMBConv.recompute): "
                        f"False e and d, dwconv e, True neither (default "
                        f"{fm.DEFAULT_RECOMPUTE}; repeat to run several levels side by side)")
    p.add_argument("--interleave", action="store_true",
                   help="time one step of each provider in turn (all models built first), "
                        "not each provider's steps in a row: fairer on a shared machine")
    p.add_argument("--saved-only", action="store_true",
                   help="measure only the saved activations (one forward per provider, no "
                        "timing)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="parameter and input dtype (default float32)")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES),
                   help="mixed precision: forward and loss under torch.autocast in this dtype "
                        "(float32 parameters; fp16 scales the loss)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last model and inputs (default NCHW)")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    p = sub.add_parser("train", help="short training run, eager vs fused from the same seed: "
                                     "loss curves, steps/s, held-out accuracy")
    p.add_argument("model", nargs="?", default="efficientnet_b0", help=model_help)
    p.add_argument("--data", choices=("digits", "synthetic"), default="digits",
                   help="digits: scikit-learn's bundled handwritten digits (default); "
                        "synthetic: generated coloured shapes")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4, help="peak AdamW learning rate")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PATH", help="write both loss curves as a PNG")

    p = sub.add_parser("geometry", help="each B0 block's kernel launches: programs and bytes")
    p.add_argument("--backend", choices=BACKENDS, default="triton")
    p.add_argument("--batch", type=int, nargs="+",
                   default=list(profiling.accounting.GEOMETRY_BATCHES))
    p.add_argument("--device")
    return parser


def _positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    commands = {"info": cmd_info, "report": cmd_report, "verify": cmd_verify, "bench": cmd_bench,
                "train": cmd_train, "geometry": cmd_geometry}
    try:
        if args.command == "geometry":
            _positive(argparse.Namespace(batch=min(args.batch)), "batch")
        else:
            _positive(args, "batch", "resolution", "steps")
        return commands[args.command](args)
    except (UsageError, verification.ModelNotFound, verification.MissingPackage) as exc:
        print(f"fused-mbconv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except verification.FusedPathUnavailable as exc:
        print(f"fused-mbconv {args.command}: {exc}", file=sys.stderr)
        return 1


def entry_point() -> None:
    sys.exit(main())
