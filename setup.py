import importlib.util
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent  # pip < 24 runs setup.py with a bare relative __file__


def _load_build_config():
    """fused_mbconv/_build.py by path: the package itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("_fused_mbconv_build",
                                                  ROOT / "fused_mbconv" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    """fused_mbconv._C (CPU kernels + op schemas) always; fused_mbconv._C_cuda when nvcc and a
    CUDA build of torch are present (see fused_mbconv/_build.py for the switches)."""
    build = _load_build_config()
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("fused_mbconv compiles against the installed torch: install torch "
                           "first, then `pip install --no-build-isolation ...`") from exc
    cuda, why = build.cuda_build_decision()
    if cuda:
        build.prepare_cuda_env()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda paths: [str(Path(p).relative_to(ROOT)) for p in paths]  # noqa: E731
    modules = [CppExtension("fused_mbconv._C", rel(build.cpu_sources()),
                            include_dirs=build.include_dirs(),
                            extra_compile_args={"cxx": build.CXX_FLAGS},
                            extra_link_args=build.LD_FLAGS)]
    if cuda:
        modules.append(CUDAExtension(
            "fused_mbconv._C_cuda", rel(build.cuda_sources()),
            include_dirs=build.include_dirs(),
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": build.NVCC_FLAGS + build.gencode_flags()
                                + build.cuda_extra_include_flags()}))
    print(f"fused_mbconv: building CPU extension; CUDA extension: "
          f"{'yes' if cuda else 'no'} ({why})")
    return modules, {"build_ext": BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _extensions()
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (ROOT / "fused_mbconv" / "_version.py").read_text()).group(1)

setup(
    name="fused_mbconv",
    version=VERSION,
    description="Fused depthwise-conv + BatchNorm + SiLU + squeeze-excite kernels for training "
                "EfficientNet-family networks",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # One import namespace: the Triton sources in kernels/ install as fused_mbconv.kernels.
    packages=["fused_mbconv", "fused_mbconv.ops", "fused_mbconv.kernels"],
    package_dir={"fused_mbconv": "fused_mbconv", "fused_mbconv.kernels": "kernels"},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    # The range CI tests: .ci/oldest (torch 2.13.0, triton 3.6.0) and .ci/run (the newest).
    # numpy: without it, importing torch prints "Failed to initialize NumPy" on a first run.
    install_requires=["torch>=2.13", "triton>=3.6; platform_system == 'Linux'", "ninja", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "timm", "torchvision", "matplotlib",
                 "onnx", "onnxscript", "transformers", "scikit-learn"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
        "cli": ["matplotlib", "tqdm", "scikit-learn"],
    },
    entry_points={"console_scripts": ["fused-mbconv = fused_mbconv.cli:main"]},
)
