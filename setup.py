from setuptools import setup

# `lowerings/` lives at the top of the repo (it holds private Inductor code, kept apart from the
# package proper) and is installed as the subpackage `inductor_w4a8.lowerings`.
setup(
    name="inductor_w4a8",
    version="0.1.0",
    description="W4A8 Mixture-of-Experts as torch.library custom ops with Inductor lowerings",
    packages=["inductor_w4a8", "inductor_w4a8.kernels", "inductor_w4a8.launch", "inductor_w4a8.lowerings"],
    package_dir={"inductor_w4a8.lowerings": "lowerings"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        # llm-compressor writes the checkpoints tests/test_pretrained.py loads, compressed-tensors
        # dequantizes them for the reference; llmcompressor 0.14.0.1 pins compressed-tensors 0.19.0
        # and transformers <= 5.17.0 (tested with 5.17.0 and torch 2.13.0)
        "test": ["pytest", "expecttest", "safetensors", "numpy", "transformers", "hypothesis", "llmcompressor==0.14.0.1",
                 "compressed-tensors==0.19.0"],
        "hf": ["transformers", "safetensors"],
        "llmcompressor": ["llmcompressor==0.14.0.1", "compressed-tensors==0.19.0"],
    },
)
