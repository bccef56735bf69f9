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
