"""inductor_w4a8.bench and bench_numerics: what runs without a GPU (floor math, tables, the error
metric, the numerics pipeline on the CPU op, the command line). The timing itself runs on the GPU:
`python -m inductor_w4a8 bench` (see docs/perf.md)."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inductor_w4a8  # noqa: F401  (registers the ops)
from inductor_w4a8 import bench, bench_numerics

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# ceilings and the floor
# ------------------------------------------------------------------------------------------
def test_copy_and_gemm_rates():
    assert bench.copy_rate_tbps(2 * 10**12, 1.0) == pytest.approx(4.0)     # read + write bytes
    assert bench.copy_rate_tbps(4 << 30, 2e-3) == pytest.approx(2 * (4 << 30) / 2e-3 / 1e12)
    assert bench.gemm_rate_tflops(8192, 8192, 8192, 1e-3) == pytest.approx(2 * 8192**3 / 1e-3 / 1e12)


def test_floor_is_the_slower_of_bytes_and_flops():
    ceil = bench.Ceilings(hbm_tbps=4.0, fp8_tflops=1000.0)
    # 97.5 MB at 4 TB/s = 24.375 us; 1 GFLOP at 1000 TFLOP/s = 1 us -> bytes bound
    assert bench.floor_us(1e9, 97.5e6, ceil) == pytest.approx(24.375)
    # 3.09 TFLOP at 1000 TFLOP/s = 3090 us; 2 GB at 4 TB/s = 500 us -> FLOP bound
    assert bench.floor_us(3.09e12, 2e9, ceil) == pytest.approx(3090.0)
    faster = bench.Ceilings(hbm_tbps=8.0, fp8_tflops=1000.0)
    assert bench.floor_us(1e9, 97.5e6, faster) == pytest.approx(24.375 / 2)


def test_ceilings_describe_names_both_measurements():
    text = bench.Ceilings(4.31, 1372.4).describe()
    assert "4.31 TB/s" in text and "1372 TFLOP/s" in text and "8192x8192x8192" in text
    assert "4 GiB" in text


def test_gemm_bytes_counts_only_experts_hit():
    offsets = torch.tensor([0, 3, 3, 8])            # expert 1 gets no rows
    R, N, K = 8, 64, 256
    hit = 2
    want = hit * N * K // 2 + hit * N * (K // 128) * 2 + R * K + R * 4 + R * N * 2
    assert bench.gemm_bytes(R, offsets, N, K) == want


# ------------------------------------------------------------------------------------------
# the timing table
# ------------------------------------------------------------------------------------------
def _table_rows():
    return [
        {"M": 1, "R": 8, "flops": 4.0e8, "bytes": 1.0e8, "floor_us": 25.0, "ours": 50.0, "fbgemm": 75.0,
         "bf16": 160.0},
        {"M": 64, "R": 512, "flops": 2.4e10, "bytes": 2.0e9, "floor_us": 500.0, "ours": 625.0},
    ]


def test_markdown_table_cells():
    lines = bench.markdown_table(_table_rows()).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["M", "R", "ours us", "bf16 us", "fbgemm us", "floor us", "ours % of floor",
                    "ours TFLOP/s", "ours GB/s", "FBGEMM / ours"]
    assert set(lines[1]) == {"|", "-"} and lines[1].count("|") == len(head) + 1
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    assert first == ["1", "8", "50.0", "160.0", "75.0", "25.0", "50%", "8", "2000", "1.50x"]
    second = [c.strip() for c in lines[3].strip("|").split("|")]
    # no FBGEMM in the run: no ratio (no stored constants stand in for a measurement)
    assert second == ["64", "512", "625.0", "-", "-", "500.0", "80%", "38", "3200", "-"]


def test_markdown_table_without_ours():
    rows = [{"M": 1, "R": 8, "flops": 1.0, "bytes": 1.0, "floor_us": 2.0}]
    cells = [c.strip() for c in bench.markdown_table(rows).splitlines()[2].strip("|").split("|")]
    assert cells == ["1", "8", "-", "2.0", "-", "-", "-", "-"]


# ------------------------------------------------------------------------------------------
# numerics: the metric, the floor, the table, the pipeline on the CPU op
# ------------------------------------------------------------------------------------------
def test_bf16_floor_by_hand():
    # bf16 spacing at 1 is 2^-7: 1 + 3 * 2^-10 rounds to 1, 2 + 2^-6 (exact in bf16) stays
    exact = torch.tensor([1 + 3 * 2**-10, 2 + 2**-6], dtype=torch.float64)
    want = (3 * 2**-10) / math.sqrt((1 + 3 * 2**-10) ** 2 + (2 + 2**-6) ** 2)
    assert bench_numerics.bf16_floor(exact) == pytest.approx(want, rel=1e-12)


def test_error_row_by_hand():
    exact = torch.tensor([[3.0, 4.0]], dtype=torch.float64)            # norm 5
    own = torch.tensor([[3.0, 4.5]], dtype=torch.float64)
    outputs = {"ours_exact": torch.tensor([[3.0, 4.0]]).to(torch.bfloat16),
               "ours_fp8": torch.tensor([[3.0, 4.5]]).to(torch.bfloat16),
               "fbgemm": torch.tensor([[3.0, 5.0]]).to(torch.bfloat16)}
    row = bench_numerics.error_row(outputs, exact, own)
    assert row["floor"] == 0.0 and row["fp8_own_floor"] == 0.0              # all exact in bf16
    assert row["ours_exact"] == 0.0 and row["ours_fp8_own"] == 0.0
    assert row["ours_fp8"] == pytest.approx(0.5 / 5)
    assert row["fbgemm"] == pytest.approx(1.0 / 5)
    assert set(bench_numerics.error_row({}, exact, own)) == {"floor", "fp8_own_floor"}


def test_numerics_markdown_table():
    rows = [{"gemm": "w2", "N": 5120, "K": 1536, "M": 1, "R": 8, "floor": 1.66e-3, "ours_exact": 1.66e-3,
             "ours_fp8_own": 3.32e-3, "fp8_own_floor": 1.66e-3, "ours_fp8": 2.2e-2}]
    lines = bench_numerics.markdown_table(rows).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:3] == ["GEMM [N, K]", "M", "R"] and head[-1] == "ours fp8 own / its floor"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["w2 [5120, 1536]", "1", "8", "1.66e-03", "1.66e-03", "3.32e-03", "1.66e-03",
                     "2.20e-02", "-", "2.00x"]


def test_numerics_pipeline_wiring_on_cpu(seed):
    """The numerics table's pipeline with the CPU op. Its wiring, not the kernel's numerics: the CPU
    op is the fp64 reference rounded once to bf16, so ours equals each floor by construction (the
    GPU test of the same pipeline is where that can fail); the fp8 mode against the checkpoint
    must still pay the scale conversion."""
    shapes = {"w13": (64, 256), "w2": (96, 128)}
    rows = bench.measure_numerics((1, 3), 64, "cpu", fbgemm=True, experts=8, shapes=shapes, log=lambda *_: None)
    assert [(r["gemm"], r["M"], r["R"]) for r in rows] == [("w13", 1, 8), ("w13", 3, 24), ("w2", 1, 8), ("w2", 3, 24)]
    for r in rows:
        assert "fbgemm" not in r                       # no FBGEMM on CPU: no column, no stand-in
        assert 5e-4 < r["floor"] < 4e-3
        assert r["ours_exact"] == r["floor"]
        assert r["ours_fp8_own"] == r["fp8_own_floor"]
        assert r["ours_fp8"] > 3 * r["floor"]          # e4m3 group scales (3 mantissa bits)


def test_checkpoint_gemm_is_the_checkpoint(seed):
    ck = bench_numerics.checkpoint_gemm(2, 16, 256, 128, "cpu")
    from inductor_w4a8 import formats
    assert ck.q.dtype == torch.int8 and int(ck.q.min()) >= -8 and int(ck.q.max()) <= 7
    assert torch.equal(formats.decode_gemm_layout(ck.w), ck.q)
    s8, chan = formats.convert_bf16_scales_to_fp8(ck.s_bf16)
    assert torch.equal(ck.s_fp8.view(torch.uint8), s8.view(torch.uint8)) and torch.equal(ck.chan, chan)
    want = (ck.q.float() * ck.s_bf16.float().repeat_interleave(128, dim=2)).to(torch.bfloat16)
    assert torch.equal(ck.dequantized_bf16(), want)


# ------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------
def test_help_has_program_name_and_every_option_explained(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m inductor_w4a8 bench")
    for action in bench.parser()._actions:
        assert action.help, action.option_strings


def test_bad_token_count_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--m", "0"])
    assert exit_.value.code == 2
    assert "positive integer" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without a GPU sees")
def test_cpu_machine_gets_one_line_pointing_to_the_demo():
    env_path = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "inductor_w4a8", "bench"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "needs a CUDA GPU" in lines[0] and "python -m inductor_w4a8 demo" in lines[0]


def test_bad_out_directory_refused_before_the_run(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark started with an unusable --out")
    monkeypatch.setattr(bench, "run", no_run)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--out", str(blocker / "sub")])
    assert exit_.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_run_writes_tables_and_json(monkeypatch, tmp_path):
    """The run's orchestration (ceilings -> timing -> numerics -> tables -> JSON) with the GPU-only
    measurements replaced by fixed numbers."""
    import json
    ceil = bench.Ceilings(4.0, 1000.0)
    monkeypatch.setattr(bench, "measure_ceilings", lambda: ceil)
    monkeypatch.setattr(bench, "time_gemms", lambda m_list, *a, **k: [
        {"M": M, "R": 8 * M, "flops": 1e9 * M, "bytes": 1e8, "floor_us": 25.0, "ours": 40.0} for M in m_list])
    numerics_row = {"gemm": "w2", "N": 5120, "K": 1536, "M": 1, "R": 8, "floor": 1.7e-3, "fp8_own_floor": 1.7e-3,
                    "ours_exact": 1.7e-3, "ours_fp8_own": 1.7e-3, "ours_fp8": 2e-2}
    monkeypatch.setattr(bench, "measure_numerics", lambda *a, **k: [numerics_row])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test GPU")
    lines = []
    rows = bench.run((1, 64), peers=False, out_dir=str(tmp_path), numerics_m=(1,), log=lines.append)
    assert [r["M"] for r in rows] == [1, 64]
    text = "\n".join(lines)
    assert text.count(ceil.describe()) == 2                       # before and after the tables
    assert "| 1 | 8 | 40.0 |" in text and "ours fp8 own / its floor" in text
    saved = json.loads((tmp_path / "bench_grouped_gemm.json").read_text())
    assert saved["meta"]["ceilings"]["hbm_tbps"] == 4.0 and saved["meta"]["device"] == "a test GPU"
    assert saved["numerics"] == [numerics_row] and len(saved["rows"]) == 2


def test_run_keeps_the_timing_table_when_numerics_fail(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "measure_ceilings", lambda: bench.Ceilings(4.0, 1000.0))
    monkeypatch.setattr(bench, "time_gemms", lambda *a, **k: [
        {"M": 1, "R": 8, "flops": 1e9, "bytes": 1e8, "floor_us": 25.0, "ours": 40.0}])

    def broken(*a, **k):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(bench, "measure_numerics", broken)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test GPU")
    lines = []
    bench.run((1,), peers=False, out_dir=str(tmp_path), numerics_m=(1,), log=lines.append)
    text = "\n".join(lines)
    assert "numerics failed" in text and "| 1 | 8 | 40.0 |" in text
    assert (tmp_path / "bench_grouped_gemm.json").exists()
