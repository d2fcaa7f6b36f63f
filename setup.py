"""fastpatch: Triton kernels for the DUSt3R / MASt3R / CroCo ViT family.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are
installed as ``fastpatch.kernels``; nothing named ``kernels`` lands at the top level of
site-packages (that name belongs to the Hugging Face ``kernels`` package). The development
tooling in ``fastpatch_dev/`` (AOT compile helpers of the tests and benchmarks) is not packaged:
``tests/package/test_packaging.py`` checks the wheel for it.
"""
from setuptools import setup

PACKAGES = [
    "fastpatch",
    "fastpatch.launchers",
    "fastpatch.ops",
    "fastpatch.modules",
    "fastpatch.engine",
    "fastpatch.patching",
    "fastpatch.kernels",
]

setup(
    name="fastpatch",
    version="0.1.0",
    description="Fused Triton patch embedding and RoPE flash attention for DUSt3R-family models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir={"fastpatch.kernels": "kernels"},
    # Never replaces the user's torch or triton (README "Supported versions"). torch's CUDA wheels pin
    # the triton they were built with, from torch 2.5 on a triton the kernels run on (2.5 -> 3.1;
    # torch 2.4's 3.0 is not supported), so triton is not listed: listing it would install one beside
    # a CPU-only torch, and without triton the ops run their torch path. ``fastpatch[triton]`` asks
    # for one explicitly.
    install_requires=["torch>=2.5"],
    extras_require={
        "triton": ["triton>=3.1"],
        "test": ["pytest", "pytest-benchmark", "numpy"],
    },
)
