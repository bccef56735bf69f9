"""``fused-mbconv bench --dtype / --amp / --channels-last / --backend``: the settings reach the
training step that is timed, are printed and written, and bad values exit 2 naming them.

Timing itself is replaced by a spy (what is checked is what runs, not how fast); each provider
still runs the forward that measures saved activations, under the step's settings."""

import json

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv import cli, profiling

SMALL = ["efficientnet_b0", "--batch", "2", "--resolution", "32", "--no-compile"]


@pytest.fixture
def steps(monkeypatch):
    """The TrainSteps cmd_bench times, each with the dtype of its model's output seen in
    the forward that follows (the saved-bytes measurement)."""
    seen = []

    def spy(step, device, warmup, repeats, progress=None):
        entry = dict(step=step, output_dtypes=[])
        step.model.register_forward_hook(
            lambda module, inputs, output: entry["output_dtypes"].append(output.dtype))
        seen.append(entry)
        return profiling.Timing([0.5])

    monkeypatch.setattr(profiling, "time_fn", spy)
    return seen


def _params_4d(model):
    return [p for p in model.parameters() if p.dim() == 4]


def test_amp_bf16_and_channels_last_reach_every_provider(monkeypatch, steps, capsys, tmp_path):
    # no forward here (bfloat16 is slow on CPUs without it); the fp16 test runs one
    monkeypatch.setattr(profiling, "saved_bytes", lambda *args: profiling.SavedTensors(1, 1))
    path = tmp_path / "bench.json"
    assert cli.main(["bench", *SMALL, "--amp", "bf16", "--channels-last", "--backend", "torch",
                     "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "float32 parameters and inputs, AMP bfloat16, channels_last" in out
    assert len(steps) == 2  # eager and fused-torch
    for seen in steps:
        step = seen["step"]
        assert step.autocast == torch.bfloat16 and step.scaler is None
        assert step.images.dtype == torch.float32
        assert step.images.is_contiguous(memory_format=torch.channels_last)
        assert all(p.dtype == torch.float32 for p in step.model.parameters())
        assert all(p.is_contiguous(memory_format=torch.channels_last)
                   for p in _params_4d(step.model))
    meta = json.loads(path.read_text())["meta"]
    assert (meta["dtype"], meta["amp"], meta["channels_last"]) == ("float32", "bfloat16", True)
    assert meta["providers"] == ["eager", "fused-torch"]


def test_dtype_sets_parameters_and_inputs_without_autocast(steps, capsys):
    assert cli.main(["bench", *SMALL, "--dtype", "float64", "--backend", "torch"]) == 0
    assert "float64 parameters and inputs, no AMP, NCHW" in capsys.readouterr().out
    assert len(steps) == 2
    for seen in steps:
        step = seen["step"]
        assert step.autocast is None
        assert step.images.dtype == torch.float64 and step.images.is_contiguous()
        assert all(p.dtype == torch.float64 for p in step.model.parameters())
        assert seen["output_dtypes"] == [torch.float64]


def test_amp_fp16_runs_the_forward_under_autocast_and_scales_the_loss(steps):
    assert cli.main(["bench", *SMALL, "--amp", "fp16", "--backend", "torch"]) == 0
    assert len(steps) == 2
    for seen in steps:
        assert seen["step"].autocast == torch.float16
        assert seen["output_dtypes"] == [torch.float16]  # the forward ran under autocast
        assert isinstance(seen["step"].scaler, torch.amp.GradScaler)
    loss = steps[0]["step"]()  # one real step: scaled backward, unscaled SGD step
    assert torch.isfinite(loss) and steps[0]["step"].scaler.get_scale() > 0


def test_repeated_backends_in_order_and_compile_last(monkeypatch, steps, capsys):
    monkeypatch.setattr(profiling, "compile_status", lambda: (True, "stubbed"))
    monkeypatch.setattr(torch, "compile", lambda model: model)  # what runs is not timed here
    assert cli.main(["bench", *SMALL[:-1], "--backend", "torch", "--backend", "cpu",
                     "--backend", "torch"]) == 0
    assert "providers eager, fused-torch, fused-cpu, compile" in capsys.readouterr().out
    assert len(steps) == 4


def test_json_is_written_after_every_provider(monkeypatch, tmp_path):
    path = tmp_path / "bench.json"
    calls = []

    def interrupted_on_the_second(step, device, warmup, repeats, progress=None):
        calls.append(step)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. the GPU check's time box
        return profiling.Timing([0.25])

    monkeypatch.setattr(profiling, "time_fn", interrupted_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["bench", *SMALL, "--backend", "torch", "--json", str(path)])
    results = json.loads(path.read_text())["results"]
    assert [(r["provider"], r["seconds_per_step"]) for r in results] == [("eager", 0.25)]


@pytest.mark.parametrize("flag, value", [("--amp", "fp8"), ("--amp", "bfloat16"),
                                         ("--dtype", "int8"), ("--backend", "rocm")])
def test_bad_values_exit_2_naming_them(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *SMALL, flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid choice: '{value}'" in err


def test_amp_with_low_precision_parameters_exits_2(steps, capsys):
    assert cli.main(["bench", *SMALL, "--amp", "bf16", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "--amp bf16" in err and "--dtype float16" in err
    assert not steps  # nothing ran


def test_recompute_levels_run_side_by_side_for_each_backend(steps, capsys, tmp_path):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", *SMALL, "--backend", "torch", "--recompute", "False",
                     "--recompute", "True", "--recompute", "dwconv", "--json", str(path)]) == 0
    names = ["eager", "fused-torch-recompute=False", "fused-torch-recompute=True",
             "fused-torch"]  # the default level, dwconv, unsuffixed
    out = capsys.readouterr().out
    assert f"providers {', '.join(names)}" in out
    assert "min ms" in out and "min speed-up" in out
    levels = [{m.recompute for m in seen["step"].model.modules()
               if isinstance(m, fm.FusedMBConv)} for seen in steps]
    assert levels == [set(), {False}, {True}, {"dwconv"}]
    results = json.loads(path.read_text())["results"]
    assert [r["provider"] for r in results] == names
    assert all(r["seconds_min"] == 0.5 for r in results)  # the spy's one step


def test_saved_only_measures_saved_bytes_without_timing(steps, capsys, tmp_path):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", *SMALL, "--backend", "torch", "--recompute", "False",
                     "--recompute", "True", "--saved-only", "--json", str(path)]) == 0
    assert not steps  # nothing timed
    out = capsys.readouterr().out
    assert "no timing" in out and "ms/step" not in out
    saved = {r["provider"]: r["saved_bytes"] for r in json.loads(path.read_text())["results"]}
    assert list(saved) == ["eager", "fused-torch-recompute=False", "fused-torch-recompute=True"]
    assert (saved["eager"] > saved["fused-torch-recompute=False"]
            > saved["fused-torch-recompute=True"] > 0)


def test_bad_recompute_level_exits_2_naming_it(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *SMALL, "--recompute", "all"])
    assert exc.value.code == 2
    assert "argument --recompute: invalid choice: 'all'" in capsys.readouterr().err


def test_interleave_times_one_step_of_each_provider_in_turn(steps, capsys, tmp_path):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", *SMALL, "--backend", "torch", "--recompute", "False",
                     "--recompute", "True", "--interleave", "--warmup", "1", "--steps", "2",
                     "--json", str(path)]) == 0
    assert "one step of each provider in turn" in capsys.readouterr().out
    order = [seen["step"] for seen in steps]
    providers = order[:3]
    assert len({id(s) for s in providers}) == 3
    assert order == providers * 3  # 1 warm-up + 2 timed rounds, each provider once a round
    data = json.loads(path.read_text())
    assert data["meta"]["interleave"] is True
    assert [(r["provider"], r["seconds_per_step"]) for r in data["results"]] == [
        ("eager", 0.5), ("fused-torch-recompute=False", 0.5),
        ("fused-torch-recompute=True", 0.5)]
