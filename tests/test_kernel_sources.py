"""The kernels' module-level constants survive being copied into Inductor's generated code.

When the "w4a8" backend traces a Triton kernel into Inductor's output, Inductor copies the
kernel's source and the globals it reads into a new Python file, writing string constants as
one quoted line. A constant holding a newline made that file a syntax error on the GPU, and the
compile fell back to the opaque op. Every string constant a kernel module defines is one line.
"""
import importlib
import pkgutil

import pytest
import triton.language as tl

import inductor_w4a8.kernels as kernels

MODULES = sorted(m.name for m in pkgutil.iter_modules(kernels.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_string_constants_are_one_line(name):
    module = importlib.import_module(f"inductor_w4a8.kernels.{name}")
    for attr, value in vars(module).items():
        text = value.value if isinstance(value, tl.constexpr) else value
        if isinstance(text, str) and not attr.startswith("__"):
            assert "\n" not in text, f"kernels/{name}.py: {attr} holds a newline"


def test_the_decode_ptx_is_checked():
    """The constant that broke the GPU compile is among those the test above reads."""
    assert "int4_decode" in MODULES
    from inductor_w4a8.kernels import int4_decode
    assert "prmt.b32" in int4_decode.S4X8_TO_FP8_PTX.value
