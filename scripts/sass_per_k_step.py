"""SASS of the grouped GEMM's K loop per tile of the table, compiled for sm_90 on this machine
(no GPU needed): registers, stack, and per loop iteration the instruction count and its mix.

    python scripts/sass_per_k_step.py [--exact]   (the installed triton's cuobjdump; the table's
                                                  Triton tiles, then the Gluon WGMMA_TILE)

--exact compiles for bf16 scales (exact mode) instead of fp8 scales with channel scales. With
TRITON_CACHE_DIR=$(mktemp -d) TRITON_DUMP_PTXAS_LOG=1 ptxas's own log (spills, C7514/C7515
serialization warnings) is printed before each tile's line.
"""
import re, subprocess, sys, os, tempfile, glob
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from inductor_w4a8.kernels.grouped_gemm import w4a8_grouped_gemm_kernel
from inductor_w4a8.launch.gemm_tiles import GEMM_TILES, DECODE_TILE
table = [DECODE_TILE] + [t for _, t in GEMM_TILES]
EXACT = "--exact" in sys.argv
tiles = [(t.block_m, t.block_n, t.num_warps, t.num_stages, t.groups_per_step, t.prefetch_scales,
          t.tma_loads) for t in table]
cuobj = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))[0]
def print_k_loop(label, cubin, steps):
    """Registers, stack and the K loop's instruction mix of one build; steps: groups per loop
    iteration."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin); path = f.name
    sass = subprocess.run([cuobj, "-sass", path], capture_output=True, text=True).stdout
    lines = [l for l in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,6}\*/", l)]
    ops = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", l).split()[0].rstrip(";") for l in lines]
    addr = [int(re.search(r"/\*([0-9a-f]{4,6})\*/", l).group(1), 16) for l in lines]
    q = [i for i, o in enumerate(ops) if o.startswith("QGMMA") or o.startswith("HGMMA")]
    # the K loop: the shortest backward branch whose body holds the QGMMAs
    ru = subprocess.run([cuobj, "-res-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", ru, re.S); res = f"REG {m.group(1)} STACK {m.group(2)} LOCAL {m.group(3)}" if m else ru[-200:]
    best = None
    for i, l in enumerate(lines):
        m = re.search(r"BRA\s+(?:\S+\s+)?(?:`\()?(0x[0-9a-f]+)", l)
        if not m:
            continue
        tgt = int(m.group(1), 16)
        if tgt < addr[i]:
            j = next(k for k, a in enumerate(addr) if a >= tgt)
            if any(j <= x <= i for x in q) and (best is None or i - j < best[1] - best[0]):
                best = (j, i)
    body = ops[best[0]:best[1] + 1] if best else []
    n = lambda p: sum(o.startswith(p) for o in body)
    print(f"triton {triton.__version__} {label}: {res} "
          f"| K-loop instr {len(body)} ({len(body)/max(1,steps):.0f}/group): QGMMA {n('QGMMA')}, HGMMA {n('HGMMA')}, FFMA {n('FFMA')}, "
          f"FMUL {n('FMUL')}, PRMT {n('PRMT')}, LOP3 {n('LOP3')}, IMAD {n('IMAD')}, LDS {n('LDS')}, LDG {n('LDG')}, LDGSTS {n('LDGSTS')}, UTMALDG {n('UTMALDG')}, HMUL2 {n('HMUL2')}, F2FP {n('F2FP')}, STS {n('STS')}, BAR {n('BAR')}, WARPGROUP {n('WARPGROUP')}")


def print_gluon_tile():
    """The Gluon kernel's WGMMA_TILE, built as the launcher builds it (register cap); its K loop
    runs a pair of groups per iteration."""
    from inductor_w4a8.launch.gemm_tiles import WGMMA_TILE as t
    from inductor_w4a8.testing import gluon_gemm_sm90
    c = gluon_gemm_sm90(t, 128, not EXACT)
    print_k_loop(f"Gluon WGMMA_TILE {t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages} (a pair of groups per iteration)",
                 c.asm["cubin"], 2)


for bm, bn, nw, ns, gps, pf, tma in tiles:
    sig = {"a_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "w_ptr": "*u8", "s_ptr": "*bf16" if EXACT else "*fp8e4nv", "chan_ptr": "*fp32",
           "off_ptr": "*i64", "out_ptr": "*bf16", "R": "i32", "N": "i32", "K": "i32", "E": "i32"}
    const = {"GROUP": 128, "HAS_CHAN": not EXACT, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_E": 256, "USE_ASM": True, "GROUPS_PER_STEP": gps,
             "PREFETCH_SCALES": pf, "PDL": True, "TMA_LOADS": tma}
    sig.update({c: "constexpr" for c in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 9)}
    c = triton.compile(ASTSource(fn=w4a8_grouped_gemm_kernel, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": ns})
    label = (f"tile {bm}x{bn} w{nw} s{ns} gps{gps}{' prefetch_scales' if pf else ''}"
             f"{' tma_loads' if tma else ''}")
    print_k_loop(label, c.asm["cubin"], gps)
print_gluon_tile()
