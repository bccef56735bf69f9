"""torch.library custom ops under ``torch.ops.fused_mbconv``: schema, fake kernel, autograd.

Each op asks ``fused_mbconv.backends`` which backend runs it and calls that backend's kernels.
"""

from . import dwconv_bn_silu  # noqa: F401  (registers the ops)
from . import mbconv  # noqa: F401  (registers the ops)
from . import stem_head  # noqa: F401  (registers the ops)
