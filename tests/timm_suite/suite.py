"""timm's own tests/test_models.py, run on converted models: the file comes from the sdist of
the installed timm (downloaded once into the cache, never vendored), with converted_conftest.py
beside it as its conftest.py. tests/test_timm_model_suite.py runs this in the background and
reads its report.

    python tests/timm_suite/suite.py OUT_DIR

Writes OUT_DIR/junit.xml; exits with the status of that pytest run.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "fused_mbconv", "timm-sdist")

# The tests of test_models.py that take any model_name from list_models(). Not here: the
# pretrained ones (they download weights), test_model_default_cfgs_non_std (transformer-style
# models only) and test_model_features_space2depth_reduction (efficientnet_h/x, 448 px).
TESTS = (
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",  # on the meta device, once per pretrained tag
    "test_model_forward_features",
    "test_model_forward_intermediates_features",
    "test_model_forward_intermediates",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
    "test_model_forward_torchscript",
)

# A small member of each timm MBConv family, and variants that fm.convert fuses only partly:
# their fused blocks run next to blocks left as they are. Not here because none of their blocks
# converts (the conftest would fail every test): lcnet (an activation after the projection),
# mobilenetv4 (its universal inverted bottleneck), the GroupNorm/LayerNorm variants.
MODELS = (
    "efficientnet_b0",  # SiLU, squeeze-excite
    "efficientnet_lite0",  # ReLU6, no squeeze-excite
    "efficientnet_b1_pruned",  # pruned channel counts; its TF 'same'-padded blocks stay
    "efficientnet_blur_b0",  # the blocks with anti-aliasing (BlurPool) stay
    "efficientnet_cc_b0_4e",  # the CondConv (mixture of experts) blocks stay
    "efficientnet_es",  # EdgeTPU: its dense-conv ("fused MBConv") blocks stay
    "tf_efficientnet_b0",  # TF 'same' padding: the stride-1 blocks convert, the stride-2 stay
    "efficientnetv2_rw_t",  # V2: MBConv stages after dense-conv ones
    "tf_efficientnetv2_b0",  # V2 with TF 'same' padding
    "test_efficientnet",  # timm's own tiny test config (V2-style, 160 px)
    "mobilenetv2_035",  # narrow: few channels per block
    "mobilenetv2_110d",  # deeper stages
    "mobilenetv3_small_050",  # hard-swish, hard-sigmoid squeeze-excite
    "mobilenetv3_large_075",
    "mobilenetv3_rw",
    "mnasnet_small",
    "semnasnet_050",
    "spnasnet_100",
    "fbnetc_100",
    "mixnet_s",  # the mixed-kernel (MixedConv2d) blocks stay: one block converts
    "tinynet_e",  # 106 px
)


def timm_version():
    """The installed timm's version, or None."""
    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return None


def sdist(version: str) -> Path:
    path = CACHE / f"timm-{version}.tar.gz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        # into a directory of its own first, so that the cache never holds half a download
        with tempfile.TemporaryDirectory(dir=CACHE) as download:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "--no-binary", ":all:", f"timm=={version}", "-d", download],
                           check=True)
            os.replace(next(Path(download).glob("timm-*.tar.gz")), path)
    return path


def main() -> int:
    out = Path(sys.argv[1]).resolve()
    version = timm_version()
    work = out / "timm_tests"
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist(version)) as tar:
        # test_models.py imports nothing from timm's tests/ (whose conftest.py only has a
        # fixture for the CLI tests), so it is the one file needed
        source = tar.extractfile(f"timm-{version}/tests/test_models.py")
        (work / "test_models.py").write_bytes(source.read())
    shutil.copyfile(HERE / "converted_conftest.py", work / "conftest.py")
    # an ini of its own: no pytest.ini or pyproject.toml above OUT_DIR configures the run;
    # timm's markers (and timeout, for pytest-timeout) are unregistered here
    (work / "pytest.ini").write_text(
        "[pytest]\nfilterwarnings = ignore::pytest.PytestUnknownMarkWarning\n")
    env = dict(os.environ, FUSED_MBCONV_TIMM_TESTS=",".join(TESTS),
               FUSED_MBCONV_TIMM_MODELS=",".join(MODELS))
    # On GitHub Actions test_models.py leaves test_model_forward_fx_torchscript out (for
    # RAM, on models far larger than these): the selection must not depend on where it runs.
    env.pop("GITHUB_ACTIONS", None)
    # One thread: this runs beside the main test run, and two intra-op threads on a busy core
    # made it 3x slower on 2 cores (280 s against 89 s alone).
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={out / 'junit.xml'}", str(work)]
    print(f"timm {version}:", " ".join(command), flush=True)
    return subprocess.run(command, cwd=work, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
