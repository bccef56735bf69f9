import os

import pytest
import torch
from hypothesis import settings

# Under CI, hypothesis draws the same examples every run (seeded from each test's name) and
# keeps no example database: a red run reruns red, with the failing example printed.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else
                                    "default")
settings.load_profile(HYPOTHESIS_PROFILE)

# Triton decides at kernel *definition* whether to interpret, so this must precede the first
# import of fused_mbconv.kernels: it makes the "triton" backend usable on CPU tensors. Not
# where CUDA is present: the interpreter would run CUDA tensors' Triton tests on the host, so
# there they test the compiled kernels, and CPU-tensor Triton tests need a session of their
# own with TRITON_INTERPRET=1.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Eager float32 convolutions on a GPU in true float32: cuDNN's TF32 default would inflate eager's
# error, which bounds the fused kernels' (theirs multiply in IEEE float32).
torch.backends.cudnn.allow_tf32 = False

# Backends a session must have (comma-separated), by default under CI: a missing build must
# fail the run, not shrink it.
CI_REQUIRED_BACKENDS = "cpu,torch,triton"


def required_backends():
    names = os.environ.get("FUSED_MBCONV_REQUIRE_BACKENDS")
    if names is None:
        names = CI_REQUIRED_BACKENDS if os.environ.get("CI") else ""
    return [n.strip() for n in names.split(",") if n.strip()]


def pytest_sessionstart(session):
    from fused_mbconv.backends import backend_status, record
    # Each backend is required on this machine's preferred device type when it runs that one
    # (triton on CUDA where there is a GPU, on CPU under TRITON_INTERPRET=1 elsewhere).
    preferred = "cuda" if torch.cuda.is_available() else "cpu"
    missing = []
    for name in required_backends():
        backend = record(name)
        device = preferred if backend.runs(preferred) else backend.devices[0]
        usable, reason = backend_status(name, device)
        if not usable:
            missing.append(f"{name} ({device} tensors): {reason}")
    if missing:
        raise pytest.UsageError("required fused_mbconv backends are unavailable "
                                "(FUSED_MBCONV_REQUIRE_BACKENDS / CI): " + "; ".join(missing))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch):
    """Every float tensor that Python code allocates with torch.empty / empty_like (the Triton
    launchers' outputs) starts as NaN, so an element a kernel fails to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


# ---- background jobs (tests/background.py) --------------------------------------------------

@pytest.hookimpl(trylast=True)  # after -k / -m deselection: start only the selected tests' jobs
def pytest_collection_modifyitems(session, config, items):
    """Start the background jobs and run their tests last, when they are most likely done."""
    import background
    waiting = []
    for item in items:
        marker = item.get_closest_marker("background")
        if marker is not None:
            if not config.option.collectonly:
                params = getattr(item, "callspec", None)
                job = marker.args[0](**(params.params if params else {}))
                background.start(item.nodeid, job)
            waiting.append(item)
    items[:] = [item for item in items if item not in waiting] + waiting


def pytest_sessionfinish(session, exitstatus):
    import background
    background.stop_all()


@pytest.fixture
def background_result(request):
    import background
    return lambda: background.result(request.node.nodeid)


def pytest_report_header(config):
    return (f"hypothesis profile {HYPOTHESIS_PROFILE!r} (derandomize="
            f"{settings.default.derandomize}); required backends: "
            f"{', '.join(required_backends()) or 'none'}")
