"""A test session that requires a backend its machine lacks fails at the start, naming the
backend and why (tests/conftest.py): a broken build cannot land as a smaller green suite."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_session(**env):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("CI", "FUSED_MBCONV_REQUIRE_BACKENDS")}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only",
                           "-p", "no:cacheprovider", "tests/test_required_backends.py"],
                          cwd=ROOT, env=environment, capture_output=True, text=True)


def test_missing_cpu_build_fails_the_session_under_ci():
    result = run_session(CI="true", FUSED_MBCONV_LIBRARY="/nonexistent/libfused.so")
    assert result.returncode != 0
    assert "required fused_mbconv backends are unavailable" in result.stderr + result.stdout
    assert "cpu (cpu tensors): cpu extension /nonexistent/libfused.so failed to load" in \
        result.stderr + result.stdout


def test_named_backend_this_machine_lacks_fails_the_session():
    from fused_mbconv.backends import backend_status
    usable, reason = backend_status("cuda", "cuda")
    result = run_session(FUSED_MBCONV_REQUIRE_BACKENDS="torch,cuda")
    output = result.stderr + result.stdout
    if usable:
        assert result.returncode == 0, output
    else:
        assert result.returncode != 0 and f"cuda (cuda tensors): {reason}" in output, output


def test_requirements_met_collect_normally():
    result = run_session(FUSED_MBCONV_REQUIRE_BACKENDS="torch")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "3 tests collected" in result.stdout
