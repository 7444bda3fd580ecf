"""GPU diagnostic: the Triton per-token fp8 quantizer vs formats.quantize_fp8_per_token run by
torch on the CPU and on CUDA (which of the three disagree, on how many elements, and the scales)."""
import torch

from inductor_w4a8 import formats
from inductor_w4a8.launch import fp8_quant

worst = []
for trial in range(200):
    torch.manual_seed(1000 + trial)
    x = torch.randn(1, 5120, device="cuda").to(torch.bfloat16)
    kq, ks = fp8_quant.quantize_fp8_per_token(x)
    gq, gs = formats.quantize_fp8_per_token(x)
    cq, cs = formats.quantize_fp8_per_token(x.cpu())
    d_kc = int((kq.cpu().view(torch.uint8) != cq.view(torch.uint8)).sum())
    d_gc = int((gq.cpu().view(torch.uint8) != cq.view(torch.uint8)).sum())
    if d_kc or d_gc or trial < 3:
        print(f"trial {trial}: amax {float(x.float().abs().amax())} scale kernel {ks.item()!r} cuda "
              f"{gs.item()!r} cpu {cs.item()!r}; elements differing kernel-vs-cpu {d_kc}, cuda-torch-vs-cpu {d_gc}")
        if d_gc:
            i = (gq.cpu().view(torch.uint8) != cq.view(torch.uint8)).nonzero()[0, 1].item()
            v = x[0, i].float().item()
            print(f"   e.g. x={v!r} x/scale cuda={(x[0, i].float() / gs[0, 0]).item()!r} "
                  f"cpu={(torch.tensor(v) / cs[0, 0]).item()!r} -> cuda {gq[0, i].float().item()} cpu {cq[0, i].float().item()} kernel {kq[0, i].float().item()}")
