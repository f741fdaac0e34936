"""Merge speed and peak memory against what users would run instead (issue 6).

Generates Llama-layout Hugging Face folders (config.json + model.safetensors, bf16, and one case in fp16) under
``--cache`` (reused between runs), then times, each in its own process with the inputs
warm in the page cache (``cat`` first):

- ``cat`` of the inputs (the floor),
- load-whole: a fairseq-style script that loads each checkpoint whole into a float32 running sum,
- mergekit 0.1.5 ``linear`` via ``mergekit-yaml`` (when installed; it is not a dependency),
- ``python -m analysis merge RECIPE.yaml -o OUT`` (default ``--verify quick``), warm and, for the first
  case, with its inputs evicted from the page cache (``posix_fadvise``), beside what ``--dry-run`` projects.

Wall time includes process start-up for every contender; peak RSS is the child's
``ru_maxrss`` from ``wait4``. The parent never imports torch (inputs and recipes are made by
child processes): a forked child's peak RSS would otherwise include the parent's pages until
it execs. Each contender runs ``--repeat`` times and the fastest run is reported (the
machines this is measured on are shared). Usage: ``python benchmarks/merge_speed.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOAD_WHOLE = """
import sys, torch
from safetensors.torch import load_file, save_file
paths, out = sys.argv[1:-1], sys.argv[-1]
acc = None
for p in paths:
    sd = load_file(p)
    if acc is None:
        acc = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in sd.items()}
    for k, v in sd.items():
        acc[k] += v.float() / len(paths)
    del sd
save_file({k: v.to(torch.bfloat16) for k, v in acc.items()}, out, metadata={"format": "pt"})
"""


def llama_config(layers: int) -> dict:
    """A Llama with hidden 1024 and 32k vocabulary: 12 layers = 220M parameters, 29 layers = 438M."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
            "intermediate_size": 2816, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def make_inputs(root: Path, layers: int, count: int) -> list[Path]:
    """``count`` checkpoint folders of one model (cached), made in a child process."""
    return make_inputs_of(root, layers, count, "bfloat16")


def make_inputs_of(root: Path, layers: int, count: int, dtype: str) -> list[Path]:
    """``count`` checkpoint folders of one model stored in ``dtype`` (cached), made in a child process."""
    folders = _folders(root, layers, count, dtype)
    if not all((f / "model.safetensors").is_file() for f in folders):
        subprocess.run([sys.executable, __file__, "--generate", str(root), str(layers), str(count), dtype], check=True)
    return folders


def _folders(root: Path, layers: int, count: int, dtype: str) -> list[Path]:
    name = f"llama{layers}" if dtype == "bfloat16" else f"llama{layers}-{dtype}"
    return [root / name / f"checkpoint-{100 * (i + 1)}" for i in range(count)]


def generate(root: Path, layers: int, count: int, dtype: str = "bfloat16") -> None:
    """Write the checkpoint folders: random weights, each checkpoint drifting a little from the first."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folders = _folders(root, layers, count, dtype)
    config = LlamaConfig(**{k: v for k, v in llama_config(layers).items() if k != "architectures"})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=gen) * 0.02).to(getattr(torch, dtype)) for k, s in shapes.items()}
    for index, folder in enumerate(folders):
        if (folder / "model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**llama_config(layers), "torch_dtype": dtype}, indent=2))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 100 * (index + 1)}))
        state = {k: v * (1 + 0.001 * index) for k, v in base.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def timed(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[:3]} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return seconds, usage.ru_maxrss / 1024


def warm(folders: list[Path]) -> float:
    """cat the inputs to /dev/null twice; returns the second's wall time (the floor of any merge)."""
    _timed_cat(folders)
    return _timed_cat(folders)


def _timed_cat(folders: list[Path]) -> float:
    """Wall seconds of ``cat`` of the inputs to /dev/null."""
    start = time.perf_counter()
    subprocess.run(["cat", *[str(f / "model.safetensors") for f in folders]], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


MAKE_RECIPE = """
import sys
from pathlib import Path
from analysis.recipe import build_recipe, write_recipe
from analysis.run import checkpoint_ref
refs = [checkpoint_ref(f) for f in sys.argv[2:]]
write_recipe(build_recipe("sma", refs, tuple(1 / len(refs) for _ in refs)), Path(sys.argv[1]))
"""


def ours(folders: list[Path], work: Path, kernel: str | None = None, cold: bool = False) -> tuple[float, float]:
    """``analysis merge`` as users run it; ``kernel="numpy"`` without the compiled kernel (CKPT_SELECT_KERNEL);
    ``cold``: with the inputs evicted from the page cache first, read from storage."""
    recipe = _recipe(folders, work)
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    if cold:
        evict(folders)
    else:
        warm(folders)
    result = timed([sys.executable, "-m", "analysis", "merge", str(recipe), "-o", str(out)], cwd=REPO,
                   env={**os.environ, "CKPT_SELECT_KERNEL": kernel or ""})
    shutil.rmtree(out)
    return result


def _recipe(folders: list[Path], work: Path) -> Path:
    """The SMA recipe of ``folders`` in ``work`` (made once, in a child process: the parent stays torch-free)."""
    recipe = work / "recipe.yaml"
    if not recipe.exists():
        subprocess.run([sys.executable, "-c", MAKE_RECIPE, str(recipe), *map(str, folders)], cwd=REPO, check=True)
    return recipe


def evict(folders: list[Path]) -> None:
    """Drop the inputs' pages from the page cache (posix_fadvise DONTNEED: no root needed, clean pages only)."""
    for folder in folders:
        fd = os.open(folder / "model.safetensors", os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cat_cold(folders: list[Path]) -> float:
    """``cat`` of the inputs from storage: the floor of a merge that reads them from there."""
    evict(folders)
    return _timed_cat(folders)


def dry_run(folders: list[Path], work: Path, cold: bool = False) -> dict:
    """``merge --dry-run --json`` for the same merge, its inputs warm (or, ``cold``, evicted first)."""
    if cold:
        evict(folders)
    else:
        warm(folders)
    out = subprocess.run([sys.executable, "-m", "analysis", "merge", str(_recipe(folders, work)), "-o",
                          str(work / "ours"), "--dry-run", "--json"], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def projection(folders: list[Path], work: Path) -> tuple[float, float]:
    """What ``merge --dry-run`` projects for the same merge: (seconds, peak MB), to set against the measurement."""
    plan = dry_run(folders, work)
    return plan["projected_seconds"], plan["projected_peak_memory_bytes"] / 1e6


def load_whole(folders: list[Path], work: Path) -> tuple[float, float]:
    script = work / "load_whole.py"
    script.write_text(LOAD_WHOLE)
    warm(folders)
    result = timed([sys.executable, str(script), *[str(f / "model.safetensors") for f in folders],
                    str(work / "whole.safetensors")])
    (work / "whole.safetensors").unlink()
    return result


def mergekit(folders: list[Path], work: Path) -> tuple[float, float] | None:
    exe = Path(sys.executable).with_name("mergekit-yaml")
    if not exe.exists():
        return None
    import yaml
    config = {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": True},
              "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in folders]}
    (work / "mk.yaml").write_text(yaml.safe_dump(config))
    out = work / "mk_out"
    shutil.rmtree(out, ignore_errors=True)
    warm(folders)
    result = timed([str(exe), str(work / "mk.yaml"), str(out), "--no-write-model-card"])
    shutil.rmtree(out)
    return result


def best(runs: int, contender, *args) -> tuple[float, float] | None:
    """The fastest of ``runs`` runs (its peak RSS is the largest seen in any run)."""
    results = [contender(*args) for _ in range(runs)]
    if results[0] is None:
        return None
    return min(r[0] for r in results), max(r[1] for r in results)


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--generate":
        generate(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ckpt-select-merge-bench")
    parser.add_argument("--quick", action="store_true", help="Only the 8 x 220M case, without mergekit.")
    parser.add_argument("--repeat", type=int, default=2, help="Runs per contender; the fastest is reported.")
    args = parser.parse_args()
    rows = []
    small = make_inputs(args.cache, 12, 8 if args.quick else 16)
    cases = [("220M", small[:8], True)] if args.quick else \
        [("220M", small[:8], True), ("220M", small[:2], False), ("220M", small[:16], False),
         ("438M", make_inputs(args.cache, 29, 8), False),
         ("220M fp16", make_inputs_of(args.cache, 12, 8, "float16"), False)]
    for label, folders, baselines in cases:
        with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
            work = Path(tmp)
            row = {"model": label, "inputs": len(folders),
                   "input_gb": sum((f / "model.safetensors").stat().st_size for f in folders) / 1e9,
                   "cat_s": warm(folders), "ckpt_select": best(args.repeat, ours, folders, work)}
            row["dry_run"] = projection(folders, work)
            if baselines or "fp16" in label:
                row["ckpt_select_numpy"] = best(args.repeat, ours, folders, work, "numpy")
            if baselines:
                row["cold"] = {"cat_s": cat_cold(folders),
                               "projected_s": dry_run(folders, work, cold=True)["projected_seconds_uncached"],
                               "measured": best(args.repeat, ours, folders, work, None, True)}
                row["load_whole"] = best(args.repeat, load_whole, folders, work)
                row["mergekit"] = None if args.quick else best(args.repeat, mergekit, folders, work)
                if row["mergekit"] is None and not args.quick:
                    print("mergekit is not installed: its column is empty", file=sys.stderr)
            rows.append(row)
            print(json.dumps(row), flush=True)
    startup = best(args.repeat, import_time)
    machine = describe_machine()
    out = REPO / "benchmarks" / "out" / "merge_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "cores": os.cpu_count(), "machine": machine,
                               "arithmetic": arithmetic_used(), "startup_s": startup[0], "rows": rows}, indent=2))
    print(f"\n{platform.node()}: {machine}, {date.today()}, load average {os.getloadavg()[0]:.1f}, "
          f"ckpt-select arithmetic: {arithmetic_used()}\n")
    print(readme_table(rows))
    print()
    print(readme_sentence(rows, startup[0]))


def arithmetic_used() -> str:
    """Which adder the ckpt-select column ran ("compiled" or "numpy"), asked of a child (the parent stays torch-free)."""
    code = "from analysis.merge.fused import fused_kernel; print('compiled' if fused_kernel() else 'numpy')"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def import_time() -> tuple[float, float]:
    """Wall time of a process that only imports what ``analysis merge`` imports (Python start-up and imports)."""
    return timed([sys.executable, "-c", "import analysis.cli, analysis.merge"], cwd=REPO)


def describe_machine() -> str:
    """'2-core x86_64, 24 GB, Python 3.11.7, torch 2.13.0 CPU' for the README's Performance section."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = float("nan")
    try:
        torch = f", torch {version('torch')}"
    except PackageNotFoundError:
        torch = ""
    return f"{os.cpu_count()}-core {platform.machine()}, {mem_gb:.0f} GB, Python {platform.python_version()}{torch}"


def _mergekit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"mergekit {version('mergekit')}"
    except PackageNotFoundError:
        return "mergekit"


def _cell(result: tuple[float, float] | None, bold: bool = False) -> str:
    if not result:
        return ""
    seconds, mb = result
    size = f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb:.0f} MB"
    text = f"{seconds:.2f} s, {size}" if seconds < 10 else f"{seconds:.1f} s, {size}"
    return f"**{text}**" if bold else text


def readme_table(rows: list[dict]) -> str:
    """The README's merge table, ready to paste."""
    lines = [f"| inputs | `cat` | ckpt-select | ckpt-select, numpy kernel | load whole into an fp32 sum "
             f"| {_mergekit_version()} `linear` |", "|---|---|---|---|---|---|"]
    for index, row in enumerate(rows):
        lines.append(f"| {row['inputs']} × {row['model']} ({row['input_gb']:.1f} GB) | {row['cat_s']:.2f} s "
                     f"| {_cell(row['ckpt_select'], bold=index == 0)} | {_cell(row.get('ckpt_select_numpy'))} "
                     f"| {_cell(row.get('load_whole'))} | {_cell(row.get('mergekit'))} |")
    return "\n".join(lines)


def readme_sentence(rows: list[dict], startup_s: float) -> str:
    """Ratios against each baseline (the issue 6 targets: <= 0.4x load-whole, <= 0.15x mergekit) and start-up."""
    row = rows[0]
    ours = row["ckpt_select"][0]
    ratios = [f"{ours / row[key][0]:.2f}× {name}" for key, name in (("load_whole", "the load-whole script"),
                                                                    ("mergekit", "mergekit")) if row.get(key)]
    head = f"{row['inputs']} × {row['model']}: ckpt-select takes " + (" and ".join(ratios) or f"{ours:.2f} s")
    projections = "; ".join(f"{r['inputs']} × {r['model']}: {r['dry_run'][0]:.1f} s, {r['dry_run'][1]:.0f} MB "
                            f"(measured {r['ckpt_select'][0] - startup_s:.1f} s after start-up, {r['ckpt_select'][1]:.0f} MB)"
                            for r in rows if r.get("dry_run"))
    cold = row.get("cold")
    if cold and cold["measured"]:
        projected = f"{cold['projected_s']:.1f} s" if cold["projected_s"] is not None else "nothing (it saw no slower first read)"
        head += (f"; from storage (inputs evicted from the page cache; `cat` of them {cold['cat_s']:.2f} s) it takes "
                 f"{cold['measured'][0]:.2f} s, {cold['measured'][1]:.0f} MB, for which `--dry-run` projected "
                 f"{projected} after start-up")
    return (f"{head}; {startup_s:.2f} s of its {ours:.2f} s is Python start-up "
            f"(a process that only imports the merge's modules), the merge itself about {ours - startup_s:.2f} s.\n"
            f"`merge --dry-run` projected {projections}.")

if __name__ == "__main__":
    main()
