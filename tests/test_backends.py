"""The backend table (fused_mbconv/backends.py) and the rules derived from it: names, the
per-device defaults, device checks, and the errors for unknown names."""

import dataclasses
import importlib
import inspect

import pytest
import torch

import fused_mbconv as fm
from fused_mbconv import backends, interface, reference


def test_names_follow_the_table():
    assert backends.BACKENDS == tuple(b.name for b in backends.TABLE)
    assert backends.BACKENDS == ("triton", "cuda", "cpu", "torch")  # fastest first
    for b in backends.TABLE:
        assert backends.record(b.name) is b


def test_records_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        backends.record("cpu").devices = ("cuda",)


def test_default_preference_per_device_type():
    assert backends.preference("cuda") == ("triton", "cuda", "torch")
    # The Triton interpreter runs CPU tensors only when chosen.
    assert backends.preference("cpu") == ("cpu", "torch")
    assert backends.preference("meta") == ("torch",)  # the aten composite runs anything


@pytest.mark.parametrize("name, device_type, message", [
    ("cuda", "cpu", "the cuda backend runs CUDA tensors only"),
    ("cpu", "cuda", "the cpu backend runs CPU tensors only"),
    ("cuda", "meta", "the cuda backend runs CUDA tensors only"),
    ("triton", "meta", "the triton backend runs CUDA and CPU tensors only"),
])
def test_a_backend_refuses_device_types_it_does_not_run(name, device_type, message):
    assert backends.backend_status(name, device_type) == (False, message)


def test_default_device_type_of_backend_status():
    assert backends.backend_status("cuda") == backends.backend_status("cuda", "cuda")
    for name in ("triton", "cpu", "torch"):
        assert backends.backend_status(name) == backends.backend_status(name, "cpu")


def test_the_cpu_triton_interpreter_is_listed_last_and_never_the_default(monkeypatch):
    if not backends.backend_status("triton", "cpu")[0]:
        pytest.skip("triton is not usable on CPU tensors here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fm.available_backends("cpu")[-1] == "triton"
    assert backends.resolve_backend(torch.device("cpu")) != "triton"
    with fm.use_backend("triton"):
        assert backends.resolve_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at every call, never cached
    assert "triton" not in fm.available_backends("cpu")
    assert "TRITON_INTERPRET=1" in backends.backend_status("triton", "cpu")[1]


def test_a_chosen_backend_that_cannot_run_the_device_raises_with_its_reason():
    with fm.use_backend("cuda"), pytest.raises(
            RuntimeError, match="backend 'cuda' cannot run cpu tensors: the cuda backend runs "
                                "CUDA tensors only"):
        backends.resolve_backend(torch.device("cpu"))


def test_kernels_come_from_the_resolved_backends_module():
    device = torch.device("cpu")
    module = backends.kernels_for(device)
    assert module.__name__ == backends.record(backends.resolve_backend(device)).module
    with fm.use_backend("torch"):
        assert backends.kernels_for(device).__name__ == "fused_mbconv.reference"


@pytest.mark.parametrize("call", [
    lambda: backends.record("tpu"), lambda: backends.backend_status("tpu"),
    lambda: fm.set_backend("tpu"), lambda: fm.use_backend("tpu").__enter__(),
    lambda: backends.implements("tpu", ["mbconv_expand_forward"])])
def test_unknown_names_raise_naming_the_choices(call):
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; choose from \['triton', "
                                         r"'cuda', 'cpu', 'torch'\]"):
        call()
    assert backends.get_backend() is None  # a failing call changes no state


def _interface_functions(module):
    return {name: fn for name, fn in vars(module).items()
            if inspect.isfunction(fn) and hasattr(reference, name) and not name.startswith("_")}


@pytest.mark.parametrize("name", [b.name for b in backends.TABLE if b.name != "torch"])
def test_backend_functions_take_the_specification_signature(name):
    """Each backend's kernel-interface functions carry fused_mbconv.reference's parameters
    and annotations (fused_mbconv.interface.specified_by)."""
    module = importlib.import_module(backends.record(name).module)
    functions = _interface_functions(module)
    assert len(functions) >= 14, sorted(functions)  # dwconv_bn_silu's two and the block's 12
    for fn_name, fn in functions.items():
        spec = getattr(reference, fn_name)
        assert interface.parameter_names(fn) == interface.parameter_names(spec), fn_name
        assert fn.__annotations__ == spec.__annotations__, fn_name
        assert (fn.__doc__ or "").startswith(spec.__doc__ or ""), fn_name


def test_an_implementation_with_other_parameters_is_refused_at_import():
    expected = (r"mbconv_squeeze_forward\(d, bn, activation\) does not match the kernel "
                r"interface's mbconv_squeeze_forward\(d, bn2, activation\)")
    with pytest.raises(TypeError, match=expected):
        @interface.specified_by(reference.mbconv_squeeze_forward)
        def mbconv_squeeze_forward(d, bn, activation):
            return d
    with pytest.raises(TypeError, match="mbconv_expand_forward"):
        interface.specified_by(reference.mbconv_expand_forward)(reference.mbconv_squeeze_forward)
