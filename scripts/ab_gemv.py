"""GPU A/B: the table's tile vs CUDA-core decode (gemv) tiles, per GLM-4.6 GEMM, CUDA-graph
replays with the L2 flushed (bench.graph_bench_us), exact scale mode. Prints one JSON row per M."""
import json
import sys

import torch

from inductor_w4a8 import bench
from inductor_w4a8.launch.gemm_tiles import GemmTile, choose_tile

E, H, I, TOP_K, G = 160, 5120, 1536, 8, 128
GEMMS = {"w13": (2 * I, H), "w2": (H, I)}
GEMV = {"gemv 1,128,4,3,2": GemmTile(1, 128, 4, 1, 3, 2, kernel="gemv"),
        "gemv 1,64,4,4,1": GemmTile(1, 64, 4, 1, 4, 1, kernel="gemv"),
        "gemv 1,64,2,12,2": GemmTile(1, 64, 2, 1, 12, 2, kernel="gemv"),
        "gemv 2,64,2,4,2": GemmTile(2, 64, 2, 1, 4, 2, kernel="gemv")}
dev = torch.device("cuda")
torch.manual_seed(0)
weights = {n: bench.random_weights(E, N, K, G, dev) for n, (N, K) in GEMMS.items()}
for M in [int(m) for m in sys.argv[1:]] or [1, 2, 4]:
    R = M * TOP_K
    off = bench.route(M, E, TOP_K, dev)
    row = {"M": M}
    for n, (N, K) in GEMMS.items():
        a, a_scale = bench.random_activations(R, K, dev)
        tiles = {"table": choose_tile(R, N, K, E, G), **GEMV}
        for name, tile in tiles.items():
            f = bench.ours_fn(a, a_scale, weights[n], off, "exact", tile=tile)
            row[f"{n} {name}"] = round(bench.graph_bench_us(f), 1)
    print(json.dumps(row), flush=True)
