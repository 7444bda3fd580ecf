"""kernels/int4_decode.py's PTX lookups, run on the CPU by a small interpreter of the five
instructions they use, against e4m3 of the signed nibbles computed by torch (independent of the
tables). The GPU tests reach the same code only through whole GEMMs."""
import re

import torch

from inductor_w4a8.kernels import int4_decode

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    """prmt.b32 default mode: byte i of the result is byte (sel nibble i & 7) of b:a; a set bit 3
    of the nibble would replicate that byte's sign bit (the lookups never set it: checked)."""
    table = (b << 32) | a
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        assert nib < 8, "a sign-replicating selector"
        out |= ((table >> (8 * nib)) & 0xFF) << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run_ptx(ptx: str, inputs: dict[str, int]) -> dict[str, int]:
    """Registers after running the PTX body; `inputs` names the operands ($1, $2, ...)."""
    regs = dict(inputs)
    val = lambda t: regs[t] if t in regs else int(t, 0)   # noqa: E731  (a register or an immediate)
    for stmt in ptx.strip("{} ").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith((".reg", "}")):
            continue
        op, args = stmt.split(None, 1)
        d, *src = [x.strip() for x in args.split(",")]
        x = [val(t) for t in src]
        if op == "mov.b32":
            regs[d] = x[0]
        elif op == "and.b32":
            regs[d] = x[0] & x[1]
        elif op == "shr.u32":
            regs[d] = (x[0] & MASK) >> x[1]
        elif op == "lop3.b32":
            regs[d] = _lop3(*x)
        elif op == "prmt.b32":
            regs[d] = _prmt(*x)
        else:
            raise AssertionError(f"instruction the test does not know: {op}")
        regs[d] &= MASK
    return regs


def _e4m3_bytes(word: int, first_nibble: int) -> int:
    """The 4 e4m3 bytes of signed nibbles first_nibble .. first_nibble + 3 of a word (torch)."""
    q = [((word >> (4 * (first_nibble + i))) & 0xF) for i in range(4)]
    q = torch.tensor([v - 16 if v >= 8 else v for v in q], dtype=torch.float32)
    b = q.to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    return b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)


def test_the_ptx_uses_only_what_the_interpreter_knows():
    for ptx in (int4_decode.S4X8_TO_FP8_PTX.value, int4_decode.S4X4_TO_FP8_PTX.value):
        ops = set(re.findall(r"(?:^|; )\s*([a-z0-9]+\.[a-z0-9.]+)\s", ptx))
        assert ops <= {"mov.b32", "and.b32", "shr.u32", "lop3.b32", "prmt.b32"}, ops


def test_s4x4_lookup_converts_the_low_four_nibbles_whatever_the_high_half():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    high = torch.randint(0, 2**16, (2**16,), generator=gen).tolist()
    for low in range(2**16):              # every combination of four nibbles
        word = (high[low] << 16) | low
        out = run_ptx(int4_decode.S4X4_TO_FP8_PTX.value, {"$1": word})["$0"]
        assert out == _e4m3_bytes(word, 0), hex(word)


def test_s4x8_lookup_and_the_s4x4_halves_agree_on_random_words():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    for word in torch.randint(0, 2**32, (512,), generator=gen, dtype=torch.int64).tolist():
        regs = run_ptx(int4_decode.S4X8_TO_FP8_PTX.value, {"$2": word})
        assert regs["$0"] == _e4m3_bytes(word, 0), hex(word)
        assert regs["$1"] == _e4m3_bytes(word, 4), hex(word)
        assert run_ptx(int4_decode.S4X4_TO_FP8_PTX.value, {"$1": word})["$0"] == regs["$0"]
        assert run_ptx(int4_decode.S4X4_TO_FP8_PTX.value, {"$1": word >> 16})["$0"] == regs["$1"]
