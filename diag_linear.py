import os, sys, torch
sys.path.insert(0, "tests")
import inductor_w4a8 as w4a8
from inductor_w4a8.testing import rel_error
from test_linear import random_layer, oracle
from inductor_w4a8.launch import _common
for N, K in ((1024, 5120), (12288, 5120), (5120, 12288)):
    for T in (1, 8, 64):
        errs = []
        for seed in range(4):
            lin, w, _ = random_layer(N, K, 128, seed=seed + 1000 * T + N, device="cuda", scale_mode="exact")
            x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
            with torch.no_grad():
                y = lin(x)
                _common.FAST_LAUNCH = False
                y2 = lin(x)
                _common.FAST_LAUNCH = True
            ref = oracle(x, w, 128)
            errs.append(f"{rel_error(y, ref):.2e}/{'same' if torch.equal(y, y2) else 'DIFF'}/floor {rel_error(ref.to(torch.bfloat16), ref):.2e}")
        print(f"N={N} K={K} T={T}:", " ".join(errs), flush=True)
