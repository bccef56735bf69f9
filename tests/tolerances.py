"""The one tolerance rule of the test suite (flash-attention's).

A fused result in dtype T is compared with a float64 reference computed from the same inputs.
Its error may be at most twice the error that eager PyTorch makes in the same dtype T against
that reference, plus a small absolute floor per dtype, scaled by the reference's magnitude:

    max|fused - ref64| <= 2 * max|eager_T - ref64| + ATOL[T] * max(1, max|ref64|)
"""

import torch

ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_close_by_rule(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor,
                         dtype: torch.dtype, what: str = "") -> None:
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fused).all(), f"{what}: non-finite values"
    ref = ref64.double()
    fused_err = (fused.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    bound = 2 * eager_err + ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert fused_err <= bound, (f"{what}: fused error {fused_err:.3g} exceeds {bound:.3g} "
                                f"(eager {dtype} error {eager_err:.3g})")
