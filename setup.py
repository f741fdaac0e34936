"""Builds the optional compiled merge kernel (analysis/merge/_fused.c); the rest of the package is in pyproject.toml.

``optional=True``: where no C compiler is found the install goes on and merges run the
numpy kernel, which writes the same bits, slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "analysis.merge._fused",
    sources=["analysis/merge/_fused.c"],
    # No fused multiply-add and no fast-math: the kernel's bits must equal numpy's (see the source).
    # -fno-trapping-math changes no result: it lets the compiler compute both sides of a select (the
    # float16 conversions), so those loops vectorise (8 x 220M fp16: ~2.4 s -> ~0.45 s of arithmetic).
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"],
    optional=True,
)])
