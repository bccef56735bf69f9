"""The fused-mbconv command: exit codes and output of every subcommand (in-process)."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv import cli, digits, synthetic, verification

SMALL = ["--batch", "2", "--resolution", "32"]
VERIFY = ["--batch", "4", "--resolution", "64"]  # the default: BN sees >= 16 values per channel


def test_info_lists_versions_and_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    for name in fm.backends.BACKENDS:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    for name in fm.available_backends("cpu"):
        assert any(line.split()[:3] == [name, "cpu", "yes"] for line in out.splitlines())


def test_python_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "fused_mbconv", "info"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backends" in result.stdout


@pytest.mark.parametrize("command", ["verify", "bench", "train", "report"])
def test_unknown_model_exits_2(capsys, command):
    assert cli.main([command, "resnet_b9"]) == 2
    assert "unknown model 'resnet_b9'" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["timm:no_such_net", "torchvision:no_such_net"])
def test_unknown_library_model_exits_2(capsys, model):
    assert cli.main(["verify", model]) == 2
    assert "has no model 'no_such_net'" in capsys.readouterr().err


def test_missing_optional_package_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    assert cli.main(["verify", "timm:efficientnet_b0"]) == 2
    assert "pip install timm" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    assert cli.main(["verify", "efficientnet_b0", "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["verify"])  # argparse: missing MODEL
    assert exc.value.code == 2


def test_report_lists_every_block(capsys):
    assert cli.main(["report", "torchvision:mnasnet1_0"]) == 0
    out = capsys.readouterr().out
    assert "16 MBConv-style blocks: 16 converted" in out
    assert out.count("converted    fused_mbconv.FusedMBConv") == 16


def test_report_says_why_a_block_stays_eager(capsys):
    assert cli.main(["report", "timm:mobilenetv4_conv_small"]) == 0
    out = capsys.readouterr().out
    assert "8 converted" in out and out.count("dw_start: a second depthwise conv") == 4, out


@pytest.mark.parametrize("command", ["verify", "bench", "train", "report"])
def test_model_with_nothing_to_fuse_says_why_and_exits_1(capsys, command):
    assert cli.main([command, "timm:resnet18"] + (SMALL if command != "report" else [])) == 1
    err = capsys.readouterr().err
    assert "no block of this model could be converted" in err
    assert "0 MBConv-style blocks" in err


def _perturbed_copy(model):
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.stages[3][0].dw_conv.weight.mul_(1.001)
    return clone


@pytest.mark.parametrize("convert, code", [(copy.deepcopy, 0), (_perturbed_copy, 1)])
def test_verify_checker_passes_identical_and_fails_perturbed(capsys, monkeypatch, convert, code):
    """The checker itself, independent of the fused path: an exact copy passes every row,
    a copy with one weight off by 0.1% fails (and exits 1)."""
    monkeypatch.setattr(verification, "convert", convert)
    assert cli.main(["verify", "efficientnet_b0"] + SMALL) == code
    out = capsys.readouterr().out
    assert "train running_var" in out and "eval parameter grads" in out
    assert ("FAIL" in out) == (code == 1)


def test_verify_fused_efficientnet_b0(capsys):
    assert cli.main(["verify", "efficientnet_b0"] + VERIFY) == 0
    out = capsys.readouterr().out
    assert "checks passed" in out and "FAIL" not in out


def test_relative_error_is_undefined_for_a_reference_at_rounding_level():
    from fused_mbconv.tolerances import compare
    ref = torch.randn(50, dtype=torch.float64)
    fused, eager = ref.float() + 1e-3, ref.float()
    assert compare(fused, eager, ref, torch.float32).relative_error == pytest.approx(
        (fused.double() - ref).abs().max().item() / ref.abs().max().item())
    # a gradient that is zero in exact arithmetic: the float64 reference keeps ~1e-14 of noise
    noise = torch.randn(50, dtype=torch.float64) * 1e-14
    result = compare(torch.randn(50) * 1e-6, torch.randn(50) * 1e-6, noise, torch.float32)
    assert result.passed and math.isnan(result.relative_error)


def test_bench_writes_json(capsys, tmp_path):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "efficientnet_b0", "--steps", "1", "--warmup", "0",
                     "--no-compile", "--json", str(path)] + SMALL) == 0
    results = json.loads(path.read_text())["results"]
    providers = [r["provider"] for r in results]
    assert providers[0] == "eager" and any(p.startswith("fused-") for p in providers)
    assert all(r["seconds_per_step"] > 0 and r["saved_bytes"] > 0 for r in results)
    assert "images/s" in capsys.readouterr().out


@pytest.mark.parametrize("data", ["digits", "synthetic"])
def test_train_plots_both_curves(capsys, tmp_path, data):
    path = tmp_path / "loss.png"
    assert cli.main(["train", "--data", data, "--steps", "3", "--batch", "4", "--resolution",
                     "32", "--plot", str(path)]) == 0
    assert path.stat().st_size > 0
    out = capsys.readouterr().out
    assert "largest loss difference eager vs fused" in out
    assert out.count("steps/s, held-out accuracy") == 2
    assert ("handwritten digits" in out) == (data == "digits")


def test_train_rejects_a_bad_learning_rate(capsys):
    assert cli.main(["train", "--lr", "0"]) == 2
    assert "--lr must be > 0" in capsys.readouterr().err


def test_train_without_scikit_learn_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert cli.main(["train", "--steps", "1"]) == 2
    assert "pip install scikit-learn" in capsys.readouterr().err


def test_digits_split_is_seeded_disjoint_and_normalized():
    a, b, c = digits.load(16, 0), digits.load(16, 0), digits.load(16, 1)
    assert torch.equal(a.val_images, b.val_images) and not torch.equal(a.val_images,
                                                                       c.val_images)
    assert len(a.train_labels) + len(a.val_labels) == 1797
    assert a.train_images.shape[1:] == (3, 16, 16)
    assert set(a.val_labels.tolist()) == set(range(10))
    pixels = torch.cat([a.train_images, a.val_images])
    assert abs(pixels.mean().item()) < 1e-4 and abs(pixels.std().item() - 1) < 1e-3
    # no held-out image is also a training image
    train = {tuple(x.flatten().tolist()) for x in a.train_images[:, 0]}
    assert sum(tuple(x.flatten().tolist()) in train for x in a.val_images[:, 0]) < 5
    batches = list(a.batches(100, 20, torch.Generator().manual_seed(0)))
    assert len(batches) == 20 and all(len(labels) == 100 for _, labels in batches)
    first_epoch = torch.cat([labels for _, labels in batches])[:len(a.train_labels)]
    assert torch.equal(first_epoch.sort().values, a.train_labels.sort().values)


def test_synthetic_shapes_are_deterministic_and_labelled():
    a = synthetic.shapes_batch(8, 32, torch.Generator().manual_seed(3))
    b = synthetic.shapes_batch(8, 32, torch.Generator().manual_seed(3))
    c = synthetic.shapes_batch(8, 32, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (8, 3, 32, 32) and a[1].min() >= 0
    assert a[1].max() < len(synthetic.CLASSES)
