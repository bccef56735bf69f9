"""Copied as conftest.py next to timm's own tests/test_models.py by tests/timm_suite/suite.py
(never loaded by our own test run: it is no conftest.py here).

Every model a selected test creates is ``fm.convert``-ed, and a test fails if any of its models
converted no block: it would only re-test timm. FUSED_MBCONV_TIMM_TESTS and
FUSED_MBCONV_TIMM_MODELS (comma-separated) select the tests and the architectures; every other
test of test_models.py is deselected.
"""

import os

import pytest
import timm

import fused_mbconv as fm

TESTS = set(os.environ["FUSED_MBCONV_TIMM_TESTS"].split(","))
MODELS = set(os.environ["FUSED_MBCONV_TIMM_MODELS"].split(","))


def _architecture(item):
    params = getattr(item, "callspec", None)
    name = params.params.get("model_name") if params else None
    # the default_cfgs tests run once per pretrained tag: "efficientnet_b0.ra_in1k"
    return name.split(".")[0] if isinstance(name, str) else None


def pytest_collection_modifyitems(config, items):
    selected, deselected = [], []
    for item in items:
        model = _architecture(item)
        if item.originalname in TESTS and model in MODELS:
            # junitxml reports these, so the caller can check each (test, model) pair ran
            item.user_properties += [("timm_test", item.originalname), ("model", model)]
            selected.append(item)
        else:
            deselected.append(item)
    config.hook.pytest_deselected(items=deselected)
    items[:] = selected


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    created = []  # (create_model arguments, ConversionReport) of each model the test made
    # test_models.py calls create_model by the name it imported (`from timm import ...`)
    create_model = timm.models.create_model

    def create_converted(*args, **kwargs):
        model = fm.convert(create_model(*args, **kwargs))
        created.append((args, kwargs, fm.convert_report(model)))
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(item.module, "create_model", create_converted)
        patch.setattr(timm, "create_model", create_converted)
        result = yield  # a failure or skip of the test itself propagates unchanged
    if not created:
        pytest.fail("the test created no model, so it tested no converted block")
    for args, kwargs, report in created:
        if not report.converted:
            call = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
            reasons = sorted({b.reason for b in report.blocks}) or ["no MBConv-style block"]
            pytest.fail(f"fm.convert converted no block of create_model({call}), so this test "
                        f"checks nothing of fused_mbconv: {'; '.join(reasons)}")
    item.user_properties.append(
        ("converted_blocks", ",".join(str(len(r.converted)) for *_, r in created)))
    return result
