"""bench_block.py on CPU (CI): the one-line refusal without a GPU (also through
`python -m inductor_w4a8 bench --block`), the table, and that the "two GEMMs" it times are the
block's own two GEMMs on the block's own inputs. The timing itself runs on the GPU only."""
from __future__ import annotations

import pytest
import torch

from inductor_w4a8 import bench_block, testing
from inductor_w4a8.__main__ import main as cli_main

from compile_utils import make_inputs, make_moe


def test_without_a_gpu_one_clear_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", "--block"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "python -m inductor_w4a8 demo" in lines[0]


def test_block_gets_its_token_counts_and_scale_mode(monkeypatch, tmp_path):
    """--block passes --m, --scale-mode and --out on (its own token counts when --m is not given)."""
    from inductor_w4a8 import bench
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    monkeypatch.setattr(bench_block, "run", lambda m, out_dir, scale_mode: calls.append((m, out_dir, scale_mode)))
    assert bench.main(["--block", "--out", str(tmp_path)]) == 0
    assert bench.main(["--block", "--m", "1", "64", "--scale-mode", "fp8", "--out", str(tmp_path)]) == 0
    assert calls == [(bench_block.BLOCK_M, str(tmp_path), None), ((1, 64), str(tmp_path), "fp8")]


def test_markdown_table_has_every_column_and_the_share():
    row = {"M": 1, "eager_us": 140.0, "eager_host_us": 120.5, "compiled_us": 100.0,
           "compiled_host_us": 60.0, "graph_us": 80.0, "gemms_us": 64.0, "non_gemm_us": 16.0}
    lines = bench_block.markdown([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[2].count("|") == 10
    assert lines[2] == "| 1 | 140.0 | 120.5 | 100.0 | 60.0 | 80.0 | 64.0 | 16.0 | 20.0 |"


def test_two_gemms_are_the_blocks_own(seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(11, moe, seed=seed)
    with torch.no_grad():
        with testing.recorded_op_outputs("grouped_gemm") as rec:
            moe(x, logits)
        h, y = bench_block.gemms_fn(moe, x, logits)()
    assert torch.equal(h, rec["grouped_gemm"][0]) and torch.equal(y, rec["grouped_gemm"][1])
