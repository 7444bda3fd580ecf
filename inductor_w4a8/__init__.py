"""W4A8 Mixture-of-Experts (int4 weights, fp8 per-token activations) for torch.compile."""
from . import formats, ops  # noqa: F401  (registers the w4a8:: ops)
from .checks import W4A8InputError, value_checks
from .formats import quantize_w4
from .moe import W4A8MoE
from .postprocess import process_weights_after_loading
from . import backend  # noqa: F401  (registers the "w4a8" torch.compile backend)
from .cudagraph import CUDAGraphRunner, capture_sizes
from .hf import patch_moe
from .linear import W4A8Linear
from .pretrained import from_pretrained

__all__ = ["formats", "ops", "W4A8InputError", "value_checks", "quantize_w4",
           "process_weights_after_loading", "W4A8MoE", "backend", "capture_sizes", "CUDAGraphRunner",
           "patch_moe", "W4A8Linear", "from_pretrained"]
