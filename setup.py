"""Builds the optional compiled merge kernel (analysis/_fused.c); the rest of the package is in pyproject.toml.

``optional=True``: where no C compiler is found the install goes on and merges run the
numpy kernel, which writes the same bits, slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "analysis._fused",
    sources=["analysis/_fused.c"],
    # No fused multiply-add and no fast-math: the kernel's bits must equal numpy's (see the source).
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
    optional=True,
)])
