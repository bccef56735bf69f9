"""``python -m fused_mbconv``: the ``fused-mbconv`` command."""

from .cli import entry_point

entry_point()
