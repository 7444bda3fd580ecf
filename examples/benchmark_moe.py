"""The W4A8 MoE benchmark (GLM-4.6 shapes): a thin wrapper of `python -m inductor_w4a8 bench`.

    python examples/benchmark_moe.py [--m 1 16 64 ...] [--scale-mode fp8|exact] [--out DIR]
    python examples/benchmark_moe.py --block [--m 1 64 8192] [--scale-mode fp8|exact] [--out DIR]
"""
import sys

from inductor_w4a8.bench import main

if __name__ == "__main__":
    sys.exit(main())
