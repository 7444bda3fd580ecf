"""@triton.jit code only, one file per kernel family. Launchers live in `inductor_w4a8.launch`."""
