"""W4A8 Mixture-of-Experts (int4 weights, fp8 per-token activations) for torch.compile."""
from . import formats, ops  # noqa: F401  (registers the w4a8:: ops)
from .checks import W4A8InputError, value_checks
from .formats import quantize_w4

__all__ = ["formats", "ops", "W4A8InputError", "value_checks", "quantize_w4"]
