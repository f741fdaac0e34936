"""The compiled merge kernel (analysis/_fused.c via analysis/fused.py): built, exact, refused when not.

The kernel is trusted only because it writes numpy's bits, which write the reference's
bits (test_merge_engine). These tests pin that chain: the install builds it wherever a C
compiler is (so CI exercises it instead of quietly running numpy), a merge through it
equals the plain-torch reference and the numpy kernel bit for bit, a kernel compiled with
fused multiply-add is caught by the load-time check, and the switch to turn it off works.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import platform
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from analysis.merge import fused
from analysis.merge.read import BLOCK_ELEMENTS, Block
from analysis.checkpoints import TensorInfo
from analysis.merge import merge_checkpoints
from analysis.run import checkpoint_ref
from analysis.merge.arithmetic import NumpyAdder
from analysis.merge.average import arithmetic
from conftest import REPO
from test_merge_engine import reference_average, special_values_state

SOURCE = REPO / "analysis" / "merge" / "_fused.c"
# setup.py's compile flags for the kernel
INSTALL_FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math")


def compiler() -> str | None:
    """The C compiler the install would use, if there is one here."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) or shutil.which("cc")


def compile_kernel(out: Path, *flags: str) -> fused.Kernel:
    """analysis/_fused.c built with ``flags`` into ``out``, loaded as analysis.fused loads it."""
    import subprocess
    include = sysconfig.get_paths()["include"]
    subprocess.run([compiler(), "-shared", "-fPIC", f"-I{include}", *flags, str(SOURCE), "-o", str(out)],
                   check=True, capture_output=True)
    kernel = ctypes.CDLL(str(out)).ckpt_fused_average
    kernel.restype = ctypes.c_int
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return kernel


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch):
    """Set CKPT_SELECT_KERNEL for one test; the loaded kernel is forgotten before and after."""
    def use(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(fused.KERNEL_ENV, raising=False)
        else:
            monkeypatch.setenv(fused.KERNEL_ENV, value)
        fused.fused_kernel.cache_clear()
    yield use
    monkeypatch.delenv(fused.KERNEL_ENV, raising=False)
    fused.fused_kernel.cache_clear()


def test_the_install_builds_the_kernel_wherever_a_c_compiler_is(kernel_env) -> None:
    if compiler() is None:
        pytest.skip("no C compiler here: merges run the numpy kernel (same bits, slower)")
    kernel_env(None)
    assert fused.fused_kernel() is not None, "setup.py's optional build failed: run `make setup` and read its output"


def test_a_merge_through_the_kernel_equals_the_reference_and_the_numpy_kernel(tmp_path: Path, kernel_env) -> None:
    if fused.fused_kernel() is None:
        pytest.skip("no compiled kernel in this install")
    gen = torch.Generator().manual_seed(3)
    shapes = {"embed": (BLOCK_ELEMENTS // 100 + 7, 100), "big": (3 * BLOCK_ELEMENTS + 5,), "tiny": (3,),
              "empty": (0, 4)}
    for in_dtype in (torch.bfloat16, torch.float32, torch.float16):
        states = [{name: (torch.randn(shape, generator=gen) * 10 ** (i - 2)).to(in_dtype) for name, shape in shapes.items()}
                  | {"norm": torch.tensor([-0.0, 0.0, -0.0], dtype=in_dtype), "step": torch.tensor(i)} for i in range(6)]
        paths = [tmp_path / f"{in_dtype}-{i}.safetensors" for i in range(6)]
        for state, path in zip(states, paths):
            save_file(state, str(path))
        weights = [0.05, 0.1, 0.15, 0.2, 0.2, 0.3]
        for out_dtype in ("same", "float32", "bfloat16", "float16"):
            merged = {}
            for kernel in ("compiled", "numpy"):
                kernel_env(None if kernel == "compiled" else "numpy")
                out = tmp_path / f"out-{in_dtype}-{out_dtype}-{kernel}"
                result = merge_checkpoints([checkpoint_ref(p) for p in paths], weights, out, out_dtype)
                merged[kernel] = load_file(str(result.model_file))
            expected = reference_average(states, weights, out_dtype)
            for name, tensor in expected.items():
                for kernel, tensors in merged.items():
                    assert tensors[name].dtype == tensor.dtype, (kernel, name)
                    assert tensors[name].shape == tensor.shape, (kernel, name)
                    assert torch.equal(tensors[name].reshape(-1).view(torch.uint8),
                                       tensor.reshape(-1).view(torch.uint8)), (in_dtype, out_dtype, kernel, name)


def test_the_kernel_writes_numpy_bits_on_special_values_for_every_pair_it_covers() -> None:
    kernel = fused.fused_kernel()
    if kernel is None:
        pytest.skip("no compiled kernel in this install")
    for in_dtype, bits in (("float32", torch.int32), ("bfloat16", torch.int16), ("float16", torch.int16)):
        states = [special_values_state(seed) for seed in range(5)]
        rows = np.stack([torch.cat([s["specials"], s["random"]]).to(getattr(torch, in_dtype)).view(bits).numpy()
                         for s in states]).view(np.uint32 if in_dtype == "float32" else np.uint16)
        weights = [0.3, -0.1, 0.25, 1 / 3, 0.2]
        for out_dtype in ("float32", "bfloat16", "float16"):
            info = TensorInfo("w", (rows.shape[1],), out_dtype, 0)
            block = Block(info, 0, rows.shape[1], tuple(rows), (in_dtype,) * 5, rows, 0)
            expected = NumpyAdder(weights, rows.shape[1]).add(block).copy()
            got = fused.FusedAdder(weights, rows.shape[1], kernel).add(block)
            assert got.dtype == expected.dtype and fused.same_values(got, expected, out_dtype), (in_dtype, out_dtype)
    assert fused.agrees_with_numpy(kernel)


def test_blocks_the_kernel_does_not_cover_go_to_numpy() -> None:
    kernel = fused.fused_kernel()
    if kernel is None:
        pytest.skip("no compiled kernel in this install")
    double = np.array([[1.0, 2.0, np.nan], [3.0, -0.0, 1.0]], dtype=np.float64).view(np.uint64)
    mixed = (np.array([1.5, 2.0, -1.0], dtype=np.float32).view(np.uint32),
             np.array([0x3FC0, 0x4000, 0x7F80], dtype=np.uint16))
    adder = fused.FusedAdder([0.5, 0.5], 3, kernel)
    got = adder.add(Block(TensorInfo("d", (3,), "float32", 12), 0, 3, tuple(double), ("float64",) * 2, double, 0))
    assert got.dtype == np.float32 and got[:2].tolist() == [2.0, 1.0] and np.isnan(got[2])
    got = adder.add(Block(TensorInfo("m", (3,), "float32", 12), 0, 3, mixed, ("float32", "bfloat16"), None, 0))
    assert got.tolist() == [1.5, 2.0, np.inf]


def test_a_kernel_compiled_with_fused_multiply_add_is_refused(tmp_path: Path, kernel_env,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if compiler() is None:
        pytest.skip("no C compiler here")
    if platform.machine() != "x86_64" or "fma" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("needs an x86-64 CPU with FMA to build the wrong kernel")
    good = compile_kernel(tmp_path / "good.so", *INSTALL_FLAGS)
    contracted = compile_kernel(tmp_path / "fma.so", "-O3", "-mfma", "-ffp-contract=fast")
    assert fused.agrees_with_numpy(good)
    assert not fused.agrees_with_numpy(contracted)
    # installed in the package's place, it is refused with a warning and merges run numpy
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: importlib.machinery.ModuleSpec(name, None, origin=str(tmp_path / "fma.so")))
    kernel_env(None)
    with pytest.warns(RuntimeWarning, match="merging with the numpy kernel instead"):
        assert fused.fused_kernel() is None


@pytest.mark.parametrize("isa", ["x86-64", "avx2", "avx512f"])
def test_every_variant_the_build_dispatches_to_writes_numpy_bits(tmp_path: Path, isa: str) -> None:
    """The install's one build holds a baseline, an AVX2 and an AVX-512 variant and runs the widest the
    CPU has; each is built alone here and checked, so a CPU that gets another variant gets the same bits."""
    if compiler() is None or platform.machine() != "x86_64":
        pytest.skip("needs a C compiler on x86-64")
    if isa != "x86-64" and isa not in Path("/proc/cpuinfo").read_text().split():
        pytest.skip(f"this CPU has no {isa}")
    assert all(f'"{flag}"' in (REPO / "setup.py").read_text() for flag in INSTALL_FLAGS)   # what the install uses
    flags = ["-march=x86-64"] if isa == "x86-64" else [f"-m{isa}"]
    kernel = compile_kernel(tmp_path / f"{isa}.so", *INSTALL_FLAGS, "-DCKPT_SINGLE_TARGET", *flags)
    assert fused.agrees_with_numpy(kernel)
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 2 ** 16, size=(7, 5000), dtype=np.uint16)
    weights = list(rng.uniform(-1, 1, 7))
    block = Block(TensorInfo("w", (5000,), "bfloat16", 0), 0, 5000, tuple(rows), ("bfloat16",) * 7, rows, 0)
    assert np.array_equal(fused.FusedAdder(weights, 5000, kernel).add(block),
                          NumpyAdder(weights, 5000).add(block))


def test_the_environment_switch_turns_the_kernel_off(tmp_path: Path, kernel_env) -> None:
    save_file({"w": torch.ones(4, dtype=torch.bfloat16)}, str(tmp_path / "a.safetensors"))
    from analysis.checkpoints import open_checkpoint
    with open_checkpoint(tmp_path / "a.safetensors") as handle:
        kernel_env("numpy")
        assert fused.fused_kernel() is None
        assert arithmetic([handle], handle.tensors()) == "numpy"
        kernel_env(None)
        assert arithmetic([handle], handle.tensors()) == ("compiled" if compiler() is not None else "numpy")
        float8 = [TensorInfo("w", (4,), "float8_e4m3fn", 4)]
        assert arithmetic([handle], float8) == "torch"
        if compiler() is not None:
            double = [TensorInfo("w", (4,), "float64", 32)]
            assert arithmetic([handle], double) == "compiled and numpy"    # a float64 output goes to numpy


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 9), count=st.integers(0, 2100), in_dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       out_dtype=st.sampled_from(["float32", "bfloat16", "float16"]), seed=st.integers(0, 2 ** 32 - 1),
       weights=st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=9, max_size=9))
def test_the_kernel_equals_numpy_on_arbitrary_bit_patterns(n: int, count: int, in_dtype: str, out_dtype: str,
                                                           seed: int, weights: list[float]) -> None:
    """Any bits at all (NaN payloads, subnormals, infinities), any weights, sizes around the chunk edges."""
    kernel = fused.fused_kernel()
    if kernel is None:
        pytest.skip("no compiled kernel in this install")
    rng = np.random.default_rng(seed)
    bits = np.uint32 if in_dtype == "float32" else np.uint16
    rows = rng.integers(0, np.iinfo(bits).max, size=(n, count), dtype=bits, endpoint=True)
    info = TensorInfo("w", (count,), out_dtype, 0)
    block = Block(info, 0, count, tuple(rows), (in_dtype,) * n, rows, 0)
    expected = NumpyAdder(weights[:n], max(count, 1)).add(block).copy()
    got = fused.FusedAdder(weights[:n], max(count, 1), kernel).add(block)
    # bit for bit; a NaN's payload in a float32/float16 output is the hardware's (bfloat16 NaN: 0xFFFF, compared)
    assert got.dtype == expected.dtype and fused.same_values(got, expected, out_dtype)
