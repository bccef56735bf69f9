import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
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
    install_requires=["torch>=2.5", "triton; platform_system == 'Linux'", "ninja"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "timm", "torchvision", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
        "cli": ["matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["fused-mbconv = fused_mbconv.cli:main"]},
)
