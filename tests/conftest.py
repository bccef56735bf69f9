import os

# Triton decides at kernel *definition* whether to interpret, so this must precede the first
# import of fused_mbconv.kernels: it makes the "triton" backend usable on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
