"""timm's own tests/test_models.py passes on converted models: tests/timm_suite/suite.py runs
its forward, backward, default_cfgs, features, intermediates, fx and torchscript tests over
suite.MODELS, with every create_model wrapped in fm.convert (tests/timm_suite/
converted_conftest.py), in the background while the other tests run."""

import os
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

import pytest

from background import Job
from timm_suite import suite

TIMM = suite.timm_version()


def timm_suite_job():
    if TIMM is None:
        return None
    return Job(["bash", "-c", f'"{sys.executable}" "{suite.__file__}" "$OUT"'],
               scratch_env={"OUT": "."}, timeout_s=1200)


def _expected():
    """How many cases of each (test, model) pair must pass: one, and for test_model_default_cfgs
    one per pretrained tag of the model."""
    import timm
    return Counter({(test, model): len(timm.list_models(model, include_tags=True))
                    if test == "test_model_default_cfgs" else 1
                    for test in suite.TESTS for model in suite.MODELS})


def _cases(junit):
    """(test, model, converted blocks, name, outcome, traceback) of each test case: outcome is
    None when it passed, else its kind and message."""
    for case in ET.parse(junit).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")),
                       None)
        outcome = None if problem is None else \
            f"{problem.tag}: {(problem.get('message') or '').splitlines()[0][:300]}"
        yield (props.get("timm_test"), props.get("model"), props.get("converted_blocks"),
               case.get("name"), outcome, problem.text if problem is not None else "")


@pytest.mark.background.with_args(timm_suite_job)
def test_timm_test_models_pass_on_converted_models(background_result):
    if TIMM is None:
        if os.environ.get("CI"):
            pytest.fail("timm is not installed, so timm's test_models.py cannot run on converted "
                        "models: install the test extra (pip install -e '.[test]')")
        pytest.skip("timm is not installed")
    result = background_result()
    log = result.stdout + result.stderr
    junit = result.scratch / "junit.xml"
    assert junit.exists(), f"timm's test_models.py did not run:\n{log[-6000:]}"
    cases = list(_cases(junit))

    problems = defaultdict(list)  # outcome -> (name, traceback) of the cases that had it
    for *_, name, outcome, traceback in cases:
        if outcome is not None:
            problems[outcome].append((name, traceback))
    # by outcome, most frequent first: the cases, then the first one's traceback
    report = "\n\n".join(
        f"{len(had)} x {outcome}\n  {' '.join(name for name, _ in had)}\n{had[0][1][-2000:]}"
        for outcome, had in sorted(problems.items(), key=lambda p: -len(p[1])))
    if problems:  # pytest.fail: an assert would repeat the whole report as its repr
        pytest.fail(f"timm {TIMM} test_models.py on converted models:\n{report}\n\n"
                    f"... end of the run:\n{log[-1500:]}")
    # every case ran and passed: none deselected by a timm change, none added unnoticed
    ran = Counter((test, model) for test, model, *_ in cases)
    assert ran == _expected(), f"cases per (test, model) differ: ran {ran - _expected()} more, " \
                               f"{_expected() - ran} fewer than expected\n{log[-3000:]}"
    assert result.returncode == 0, log[-6000:]

    blocks = {model: converted.split(",")[0] for test, model, converted, *_ in cases}
    print(f"timm {TIMM} test_models.py: {len(cases)} passed, {len(suite.TESTS)} tests over "
          f"{len(suite.MODELS)} converted models (blocks converted: "
          f"{', '.join(f'{m} {n}' for m, n in blocks.items())})")
    print(result.stdout.strip().splitlines()[-1])  # pytest's summary line, with its duration
