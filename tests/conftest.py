import os

# Triton decides at kernel *definition* whether to interpret, so this must precede the first
# import of fused_mbconv.kernels: it makes the "triton" backend usable on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- background jobs (tests/background.py) --------------------------------------------------

def pytest_collection_modifyitems(session, config, items):
    import background
    for item in items:
        marker = item.get_closest_marker("background")
        if marker is not None:
            params = getattr(item, "callspec", None)
            background.start(item.nodeid, marker.args[0](**(params.params if params else {})))


def pytest_sessionfinish(session, exitstatus):
    import background
    background.stop_all()


@pytest.fixture
def background_result(request):
    import background
    return lambda: background.result(request.node.nodeid)
