"""Which packages ship, and the optional compiled merge kernel (analysis/merge/_fused.c); the rest is in pyproject.toml.

Packages: ``analysis`` and every subpackage under it, found at build time so a new one ships
without editing this file; and the repository's ``app/`` folder installed as ``ckpt_select_app``
(a name no other distribution will use), which ``ckpt-select ui`` serves. The app stays a folder
of top-level modules (``import state``): Streamlit puts the script's folder on ``sys.path``, so
the installed copy runs exactly as the checkout does. This lives here and not in pyproject.toml
because ``[tool.setuptools.packages.find]`` cannot install a folder under another name.

``optional=True``: where no C compiler is found the install goes on and merges run the
numpy kernel, which writes the same bits, slower.
"""

from setuptools import Extension, find_namespace_packages, setup

APP_PACKAGE = "ckpt_select_app"


def _packages() -> list[str]:
    """``analysis`` and every folder below it, then the app and its folders.

    Folders count with or without an ``__init__.py`` (the app's views/ has none), so a
    subpackage whose ``__init__.py`` is forgotten still ships.
    """
    analysis = find_namespace_packages(include=["analysis", "analysis.*"], exclude=["*__pycache__*"])
    app_folders = find_namespace_packages(where="app", exclude=["*__pycache__*"])
    return [*analysis, APP_PACKAGE, *(f"{APP_PACKAGE}.{folder}" for folder in app_folders)]


setup(
    packages=_packages(),
    package_dir={APP_PACKAGE: "app"},
    ext_modules=[Extension(
        "analysis.merge._fused",
        sources=["analysis/merge/_fused.c"],
        # No fused multiply-add and no fast-math: the kernel's bits must equal numpy's (see the source).
        # -fno-trapping-math changes no result: it lets the compiler compute both sides of a select (the
        # float16 conversions), so those loops vectorise (8 x 220M fp16: ~2.4 s -> ~0.45 s of arithmetic).
        extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"],
        optional=True,
    )],
)
