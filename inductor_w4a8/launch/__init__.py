"""Python launchers for the Triton kernels: output allocation, grids, tile choice.

Each launcher takes tensors on any device Triton can run on (CUDA, or CPU under
TRITON_INTERPRET=1 for tests) and allocates its outputs on the input's device.
"""
