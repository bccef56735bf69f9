"""How csrc/ is compiled: sources, flags, CUDA discovery. Used by setup.py (loaded by file
path, before the package is installed), by ``fused_mbconv.extension.build()`` (JIT build with
ninja) and by the nvcc compile test, so every build uses the same flags.

Environment switches:
- ``FUSED_MBCONV_CUDA``: ``0`` skips the CUDA extension, ``1`` requires it (an error when nvcc or
  a CUDA build of torch is missing); unset builds it when both are present.
- ``FUSED_MBCONV_CUDA_ARCHS``: ``;``-separated compute capabilities (default ``8.0;9.0``); no
  GPU is ever queried.
- ``MAX_JOBS``: parallel compile jobs (read by torch's ninja build).

A build runs on every CPU of its architecture: no ``-march``, so everything is compiled for the
compiler's baseline (x86-64: SSE2) except the CPU kernels, which are compiled once per CPU
capability (x86-64: default, avx2, avx512; elsewhere default only) into the same library.
Each csrc/cpu/capability/<name>.cpp includes the kernel sources of csrc/cpu/kernels/ inside its
own namespace under its ``#pragma GCC target``, after every header (so torch's and the
standard library's inline functions stay baseline code in every object: see
csrc/include/fused_mbconv/cpu/capability.h); wrapper files rather than per-file flags, because
torch's BuildExtension and the JIT build compile every source with the same flags. The library
registers one copy when it loads (csrc/cpu/dispatch.cpp): the best the CPU runs, or
``FUSED_MBCONV_CPU_CAPABILITY=default|avx2|avx512`` (read at load, as ATen's
``ATEN_CPU_CAPABILITY``). The kernel code is compiled three times; torch's headers are parsed
once per capability, not once per kernel file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


# The CPU kernels' channel loops are `omp simd` loops of math.h functions: -fno-trapping-math
# lets the compiler if-convert the activations' clamps (a float compare may trap otherwise); each
# capability's target pragma sets the vector width. torch adds -std (C++20).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cpu_sources() -> List[str]:
    """ops.cpp (the schemas), the capability dispatch and one file per CPU capability (each
    includes csrc/cpu/kernels/): one library, fused_mbconv._C."""
    return ([str(CSRC / "ops.cpp")] + sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))
            + sorted(str(p) for p in (CSRC / "cpu" / "capability").glob("*.cpp")))


def cuda_sources() -> List[str]:
    """The CUDA kernels, one .cu per op: a second library, fused_mbconv._C_cuda."""
    return sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))


def include_dirs() -> List[str]:
    return [str(CSRC / "include")]


def cuda_archs() -> List[str]:
    archs = os.environ.get("FUSED_MBCONV_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    return [a.strip() for a in re.split(r"[;, ]+", archs) if a.strip()]


def gencode_flags(archs: Optional[List[str]] = None) -> List[str]:
    flags = []
    for arch in archs or cuda_archs():
        num = arch.replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def find_nvcc() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_home() -> Optional[str]:
    """The CUDA toolkit root. nvcc on PATH may be a wrapper script (here /usr/local/bin/nvcc
    execs /usr/local/cuda-13.0/bin/nvcc), so ask nvcc itself where its tree is."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = find_nvcc()
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.M)
        if top:
            return str(Path(top.group(1).strip()).resolve())
    except (OSError, subprocess.SubprocessError):
        pass
    return str(Path(nvcc).resolve().parent.parent)


def cuda_extra_include_flags() -> List[str]:
    """nvcc flags for headers the system CUDA may lack (cusparse.h, cublas_v2.h, ...) that ATen's
    CUDA headers include; the CUDA build of torch ships them under site-packages/nvidia/cu*/include.
    That tree also holds its own (possibly newer) CUDA runtime headers, so it is searched after
    the toolkit's (-idirafter), never before: it only fills the gaps."""
    import torch

    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    flags = []
    for path in sorted(p for p in nvidia.glob("cu*/include") if p.is_dir()):
        flags += ["-Xcompiler", f"-idirafter{path}"]
    return flags


def cuda_build_decision() -> Tuple[bool, str]:
    """(build the CUDA extension?, why)."""
    switch = os.environ.get("FUSED_MBCONV_CUDA", "").strip()
    if switch == "0":
        return False, "FUSED_MBCONV_CUDA=0"
    import torch

    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if find_nvcc() is None:
        missing.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if missing:
        if switch == "1":
            raise RuntimeError("FUSED_MBCONV_CUDA=1 but " + "; ".join(missing))
        return False, "; ".join(missing)
    return True, "FUSED_MBCONV_CUDA=1" if switch == "1" else "nvcc and a CUDA build of torch found"


def prepare_cuda_env() -> None:
    """Point torch.utils.cpp_extension at the real toolkit and the chosen archs. Must run
    before torch.utils.cpp_extension is imported (it reads CUDA_HOME at import)."""
    home = cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    # Explicit -gencode flags already stop torch from querying a GPU; this keeps it so.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(cuda_archs()))


def nvcc_compile_command(source: str, output: str, archs: Optional[List[str]] = None,
                         ptxas_verbose: bool = True) -> List[str]:
    """A standalone ``nvcc -c`` of one csrc/cuda source with the extension's flags (used by the
    compile test: no GPU needed)."""
    import sysconfig

    prepare_cuda_env()
    import torch
    from torch.utils import cpp_extension

    includes = (include_dirs() + cpp_extension.include_paths(device_type="cuda")
                + [sysconfig.get_paths()["include"]])
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [find_nvcc() or "nvcc", "-c", source, "-o", output, "-std=c++20",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC", *NVCC_FLAGS,
           *gencode_flags(archs), *[f"-I{d}" for d in includes], *cuda_extra_include_flags()]
    return cmd + (["-Xptxas", "-v"] if ptxas_verbose else [])


def emulation_command(output: str, sanitize: bool = False) -> List[str]:
    """A g++ build of the op schemas and csrc/cuda/ as C++ for the CPU (-DFM_CUDA_EMULATION:
    csrc/include/fused_mbconv/cuda/emulation.h runs each block's threads as fibers), into one
    library that registers the CUDA kernels for CPU tensors. Loaded instead of fused_mbconv._C
    (``FUSED_MBCONV_LIBRARY``), it lets the CPU test suite run the CUDA kernels. With
    ``sanitize``, AddressSanitizer checks their every memory access (the process then needs
    ``asan_preload()``)."""
    import torch
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = include_dirs() + cpp_extension.include_paths()
    libs = cpp_extension.library_paths()
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-fPIC", "-shared",
           "-DFM_CUDA_EMULATION", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *[f"-I{d}" for d in includes], "-x", "c++", str(CSRC / "ops.cpp"), *cuda_sources(),
           "-x", "none", *[f"-L{d}" for d in libs], *[f"-Wl,-rpath,{d}" for d in libs],
           "-lc10", "-ltorch_cpu", "-ltorch", "-o", output]
    if sanitize:
        cmd[1:1] = ["-fsanitize=address", "-fno-omit-frame-pointer"]
    return cmd


def asan_preload() -> Optional[List[str]]:
    """What LD_PRELOAD needs for a library built with ``sanitize``: the compiler's
    AddressSanitizer runtime, and libstdc++ (the sanitizer must find the real __cxa_throw when
    it starts, and python does not link libstdc++). None without a runtime."""
    paths = []
    for lib in ("libasan.so", "libstdc++.so"):
        try:
            path = subprocess.run([os.environ.get("CXX", "g++"), f"-print-file-name={lib}"],
                                  capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        if not (path and os.path.isabs(path) and os.path.exists(path)):
            return None
        paths.append(path)
    return paths
