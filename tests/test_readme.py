"""README.md as a user reads it: every ```python block runs as written (each in a fresh namespace,
in an empty working folder); a block whose first line is `# gpu-only` runs in the GPU suite only.
A new block needs no new test: it is found and run here."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GPU_ONLY = "# gpu-only"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```python block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"README.md:{start}: ```python block never closed")
            blocks.append((start, "\n".join(body) + "\n"))
        i += 1
    return blocks


def _params():
    """Each block once as CI runs it (no GPU: the blocks pick the CPU) and once in the GPU suite
    (they pick CUDA there); a `# gpu-only` block in the GPU suite only."""
    params = []
    for line, code in python_blocks(README.read_text()):
        if code.lstrip().startswith(GPU_ONLY):
            params.append(pytest.param(code, id=f"README.md:{line}-gpu",
                                       marks=[pytest.mark.cuda, pytest.mark.slow]))
            continue
        params.append(pytest.param(code, id=f"README.md:{line}"))
        params.append(pytest.param(code, id=f"README.md:{line}-gpu", marks=pytest.mark.cuda))
    return params


def test_the_readme_has_blocks_for_every_path_a_user_takes():
    code = "".join(c for _, c in python_blocks(README.read_text()))
    for call in ("save_w4a8_checkpoint(", "load_w4a8_checkpoint(", "W4A8MoE.from_float(",
                 ".load_state_dict(", "process_weights_after_loading()", 'backend="w4a8"',
                 "CUDAGraphRunner("):
        assert call in code, call
    assert any(c.lstrip().startswith(GPU_ONLY) for _, c in python_blocks(README.read_text()))


def test_block_extraction():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n  ```python\n# gpu-only\nb = 2\n  ```\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (8, "# gpu-only\nb = 2\n")]
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\na = 1\n")


@pytest.mark.parametrize("code", _params())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)           # a block that writes files writes them here
    namespace = {"__name__": "__readme__"}
    exec(compile(code, str(README), "exec"), namespace)


def test_readme_points_only_inside_the_repo():
    # links and paths a user follows must exist in a clone (no ../shared/..., no absolute /work/...)
    text = README.read_text()
    assert "../" not in text and "/work/" not in text
    for path in re.findall(r"`((?:docs|scripts|examples|tests|inductor_w4a8)/[\w./-]+)`", text):
        assert (ROOT / path.split("::")[0]).exists(), path
    for path in re.findall(r"\]\(([\w./-]+)\)", text):
        assert (ROOT / path).exists(), path
