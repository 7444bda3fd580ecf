"""examples/: each script's defaults run on a CPU machine (small presets there), GPU-only scripts
refuse in one line with exit code 2 and no traceback, bad output paths are refused before the
work starts; on a GPU, the GPU scripts' small settings run and write what they promise."""
import importlib.util
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GPU_ONLY = ["time_postprocess.py", "memcheck_grouped_gemm.py", "tune_grouped_gemm.py", "graph_report.py",
            "bench_linear.py", "bench_wgmma_gemm.py", "profile_eager.py"]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour (this machine has a GPU)")


def run_example(name, *args, timeout=600, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           **(env or {})}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    p.elapsed = time.perf_counter() - t
    print(p.stdout[-3000:], p.stderr[-3000:], f"({p.elapsed:.1f} s)", sep="\n")
    return p


def call_example(capsys, name, *args):
    """main(args) of examples/name in this process (no interpreter start-up): a result with the
    subprocess's fields (returncode, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        code = module.main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    print(captured.out[-3000:], captured.err[-3000:], sep="\n")
    return types.SimpleNamespace(returncode=code or 0, stdout=captured.out, stderr=captured.err)


def test_every_example_is_covered():
    covered = set(GPU_ONLY) | {"serve_loop.py", "transformers_moe.py", "benchmark_moe.py", "from_pretrained.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == covered


def run_ok(p, *needles):
    """p (a run_example / call_example result) exited 0 and printed every needle on stdout."""
    assert p.returncode == 0, p.stderr[-3000:]
    for needle in needles:
        assert needle in p.stdout, needle
    return p


def assert_one_line_refusal(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0]


@no_gpu
def test_gpu_only_script_refuses_as_a_process(tmp_path):
    # a whole interpreter: exit code 2, one line, no traceback, no log in the working folder
    p = run_example("tune_grouped_gemm.py", "--quick", "--out", str(tmp_path / "logs"), timeout=300,
                    env={"OUT": str(tmp_path)})
    assert_one_line_refusal(p, "needs a CUDA GPU", "python -m inductor_w4a8 demo")
    assert p.stdout == "" and list(tmp_path.iterdir()) == [] and not (ROOT / "tune_log.txt").exists()


@no_gpu
@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_script_refuses_on_cpu(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    p = call_example(capsys, name)
    assert_one_line_refusal(p, "needs a CUDA GPU", "python -m inductor_w4a8 demo")
    assert p.stdout == "" and list(tmp_path.iterdir()) == []     # nothing printed or written


@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_script_help_runs_anywhere(name, capsys):
    p = call_example(capsys, name, "--help")
    assert p.returncode == 0 and "usage:" in p.stdout and name in p.stdout


@no_gpu
@pytest.mark.parametrize("name", ["serve_loop.py", "transformers_moe.py", "from_pretrained.py"])
def test_asking_for_cuda_on_cpu_is_one_line(name, capsys):
    p = call_example(capsys, name, "--device", "cuda")
    assert_one_line_refusal(p, "--device cuda", "no CUDA GPU")


@no_gpu
def test_serve_loop_glm_layer_is_refused_on_cpu(capsys):
    # the GLM-4.6 layer on CPU reference kernels was OOM-killed (13-15 GB) without a word
    p = call_example(capsys, "serve_loop.py", "--layer", "glm")
    assert_one_line_refusal(p, "--layer glm needs a GPU", "--layer small")


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
def test_bad_output_folder_is_refused_first(under, tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("x")
    out = out / "sub" if under else out
    p = call_example(capsys, "graph_report.py", "--out", str(out))
    assert p.returncode == 2 and "argument --out" in p.stderr
    assert ("is not a writable folder" if under else "is not a folder") in p.stderr


@no_gpu
def test_serve_loop_cpu_default():
    """No options on CPU: the small layer, 8 steps, 64 tokens per step (was: the GLM layer, OOM)."""
    p = run_ok(run_example("serve_loop.py"), "layer small on cpu: 8 batches",
               "all 8 batches match eager (worst relative error 0.00e+00)", "building the small layer",
               "compiling and warming up 11 sizes", "checked 8/8 batches", "eager:", "compiled:",
               "compiled+graphs:")
    assert "w4a8: warming up (no CUDA graphs)" in p.stderr          # the runner's progress


@no_gpu
def test_transformers_moe_cpu_default():
    p = run_ok(run_example("transformers_moe.py"), "qwen3_moe: replaced 2 MoE blocks",
               "greedy tokens equal to bf16:")
    cosines = [float(line.split("cosine vs bf16 ")[1].split(",")[0])
               for line in p.stdout.splitlines() if "logits cosine vs bf16" in line]
    assert len(cosines) == 2 and min(cosines) > 0.99      # int4 RTN of random weights: ~0.999


def test_profile_eager_stub_runs_on_cpu():
    # a process of its own: --stub swaps the ops' math for allocations, which the eager path's
    # kernel lookup would keep serving to later tests in this process
    p = run_example("profile_eager.py", "--stub", "--tokens", "1", "--reps", "3", "--top", "3", timeout=300)
    assert p.returncode == 0 and "host us per forward" in p.stdout and "| direct | on |" in p.stdout


@no_gpu
def test_from_pretrained_cpu_default(capsys):
    run_ok(call_example(capsys, "from_pretrained.py"), "W4A8 MoE blocks", "generate: [")


@pytest.mark.parametrize("case", ["not-a-folder", "not-a-checkpoint", "bad-device"])
def test_from_pretrained_example_refuses_in_one_line(case, tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')   # no quantization_config
    args = {"not-a-folder": [str(tmp_path / "missing")], "not-a-checkpoint": [str(tmp_path)],
            "bad-device": ["--device", "cpux"]}[case]
    p = call_example(capsys, "from_pretrained.py", *args)
    assert_one_line_refusal(p, {"not-a-folder": "is not a checkpoint directory",
                                "not-a-checkpoint": "no quantization_config", "bad-device": "--device 'cpux'"}[case])


def test_benchmark_wrapper_passes_arguments_on(capsys, monkeypatch):
    # the benchmark itself is inductor_w4a8.bench's; the wrapper only must hand it the arguments
    monkeypatch.setattr(sys, "argv", ["benchmark_moe.py", "--help"])
    spec = importlib.util.spec_from_file_location("__main__", EXAMPLES / "benchmark_moe.py")
    with pytest.raises(SystemExit) as exit_:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# on a GPU: the GPU-only scripts' small settings run and write their files only when asked
# ------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_time_postprocess_small_layer_on_gpu():
    p = run_example("time_postprocess.py", "--experts", "8", "--repeats", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "process_weights_after_loading  scale_mode=fp8" in p.stdout
    assert "w2 convert_bf16_scales_to_fp8" in p.stdout


@pytest.mark.cuda
def test_tune_quick_writes_its_log_only_to_out_on_gpu(tmp_path):
    out = tmp_path / "tune"
    p = run_example("tune_grouped_gemm.py", "--quick", "--no-fbgemm", "--m", "1", "64", "--out", str(out),
                    env={"OUT": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "correctness PASS" in p.stdout
    log = (out / "tune_log.txt").read_text()
    assert "correctness PASS" in log and '"M": 64' in log
    assert not (ROOT / "tune_log.txt").exists()


@pytest.mark.cuda
@pytest.mark.slow
def test_graph_report_small_on_gpu(tmp_path):
    p = run_example("graph_report.py", "--max-tokens", "64", "--tokens", "1", "64", "--reps", "5",
                    "--out", str(tmp_path / "report"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "report" / "graph_report_triton_default.json").exists()


@pytest.mark.cuda
@pytest.mark.slow
def test_serve_loop_short_on_gpu():
    p = run_example("serve_loop.py", "--steps", "20", "--max-tokens", "1024")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "layer glm on cuda: 20 batches" in p.stdout and "all 20 batches match eager" in p.stdout


@pytest.mark.parametrize("name,args", [("serve_loop.py", ["--steps", "0"]), ("graph_report.py", ["--reps", "0"]),
                                       ("profile_eager.py", ["--reps", "-3"]), ("bench_linear.py", ["--tokens", "0"]),
                                       ("tune_grouped_gemm.py", ["--m", "x"]), ("time_postprocess.py", ["--experts", "0"])])
def test_a_count_below_one_is_refused_by_argparse(name, args, capsys):
    p = call_example(capsys, name, *args)
    assert p.returncode == 2 and f"argument {args[0]}" in p.stderr and "must be a positive integer" in p.stderr


def test_tune_tile_variants_parse_strictly(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from tune_grouped_gemm import parse_tile
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from inductor_w4a8.launch.gemm_tiles import DECODE_TILE, GemmTile
    assert parse_tile("16,64,4,3,3,2,p") == DECODE_TILE
    assert parse_tile("16,64,4,3,3,2") == GemmTile(16, 64, 4, 3, 3, 2)
    assert parse_tile("16,64,4,3,3") == GemmTile(16, 64, 4, 3, 3)
    assert parse_tile("2,128,4,1,4,2,gemv") == GemmTile(2, 128, 4, 1, 4, 2, kernel="gemv")
    assert parse_tile("128,128,8,4,1,wgmma") == GemmTile(128, 128, 8, 4, 1, kernel="wgmma")
    for bad in ("16,64,4,3,x", "16,64,4", "16,64,4,3,3,2,gemv,wgmma", "p", "16,64,4,3,3,2,foo"):
        with pytest.raises((TypeError, ValueError)):
            parse_tile(bad)
    p = call_example(capsys, "tune_grouped_gemm.py", "--variants", "16,64,4,3,x")
    assert p.returncode == 2 and "--variants 16,64,4,3,x: not a GemmTile" in p.stderr
    p = call_example(capsys, "tune_grouped_gemm.py", "--timing", "wall")
    assert p.returncode == 2 and "argument --timing" in p.stderr
