"""One GLM-4.6 layer GEMM for Nsight Compute: `ncu ... python scripts/ncu_gemm.py w13 8192 table`.

Runs the GEMM (w13: [E, 2I, H], w2: [E, H, I]) at M tokens x top-8 three times, so that
`--launch-skip 2 --launch-count 1 -k regex:grouped_gemm` profiles a warm launch. The tile is
`table` (choose_tile), `wgmma` (gemm_tiles.WGMMA_TILE) or a GemmTile expression.
"""
import sys

import torch

from inductor_w4a8 import bench
from inductor_w4a8.launch import gemm_tiles
from inductor_w4a8.launch.gemm_tiles import GemmTile  # noqa: F401  (for tile expressions)


def main(which: str, M: int, tile_name: str) -> None:
    E, H, I, top_k = 160, 5120, 1536, 8
    N, K = (2 * I, H) if which == "w13" else (H, I)
    wt = bench.random_weights(E, N, K, 128, "cuda")
    off = bench.route(M, E, top_k, "cuda")
    a, s = bench.random_activations(M * top_k, K, "cuda")
    tile = {"table": None, "wgmma": gemm_tiles.WGMMA_TILE}.get(tile_name)
    if tile is None and tile_name != "table":
        tile = eval(tile_name)
    fn = bench.ours_fn(a, s, wt, off, "fp8", tile=tile)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
