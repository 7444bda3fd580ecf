"""`python -m inductor_w4a8 demo | bench [args]`.

demo   the main job: write a W4A8 compressed-tensors checkpoint, load it, compile with the w4a8
       backend, capture CUDA graphs up to 8192 tokens (GPU), serve chunked-prefill and decode
       batches, print accuracy against bf16 and timings (see inductor_w4a8.demo; --help)
bench  the grouped-GEMM / MoE benchmark (inductor_w4a8.bench); every further argument is passed on
"""
from __future__ import annotations

import sys

COMMANDS = ("demo", "bench")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if command == "bench":
        from .bench import main as bench_main
        return bench_main(rest) or 0
    print(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}\n\n{__doc__.strip()}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
