"""The built-in ``hf-lm:VAL.txt`` evaluator: exact losses from real transformers models, clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.errors import EvaluatorError
from analysis.evaluate import load_evaluator
from analysis.run import open_run
from ckpt_factories import LLAMA_TEXT, tied_llama_run
from conftest import REPO

def _reference_loss(folder: Path, tokens: int, context: int) -> float:
    """The mean next-token loss computed with from_pretrained, in blocks overlapping by one token."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(list(LLAMA_TEXT.encode())[:tokens + 1])
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, context - 1):
            block = ids[start:start + context][None]
            logits = model(input_ids=block).logits
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], block[0, 1:], reduction="sum"))
    return total / (len(ids) - 1)


def test_llama_with_tied_embeddings_and_rotary_buffers_scores_exactly(tmp_path: Path) -> None:
    run = open_run(tied_llama_run(tmp_path / "run"))
    evaluator = load_evaluator(f"hf-lm:{tmp_path / 'run' / 'val.txt'}", run=run, max_tokens=300)
    assert evaluator.name == "hf-lm:val.txt (300 tokens)"
    score = evaluator.score(run.checkpoints[-1:], (1.0,))
    assert score == pytest.approx(_reference_loss(tmp_path / "run" / "checkpoint-5", 300, 48), abs=1e-5)
    assert 4.0 < score < 7.0   # an untrained model over 256 tokens: about ln 256 = 5.5


def test_every_missing_piece_is_named(tmp_path: Path, tiny_run: Path) -> None:
    text = tmp_path / "val.txt"
    text.write_text(LLAMA_TEXT)
    with pytest.raises(EvaluatorError, match="nowhere.txt: hf-lm needs a text file"):
        load_evaluator(f"hf-lm:{tmp_path / 'nowhere.txt'}", run=open_run(tiny_run))
    with pytest.raises(EvaluatorError, match="hf-lm needs a config.json"):
        load_evaluator(f"hf-lm:{text}", run=open_run(tiny_run))
    bare = open_run(tied_llama_run(tmp_path / "bare", tokenizer=False))
    with pytest.raises(EvaluatorError, match="hf-lm needs the tokenizer saved with the run"):
        load_evaluator(f"hf-lm:{text}", run=bare)
    short = tmp_path / "short.txt"
    short.write_text("x")
    with pytest.raises(EvaluatorError, match="needs at least two tokens"):
        load_evaluator(f"hf-lm:{short}", run=open_run(tied_llama_run(tmp_path / "with_tokenizer")))


def test_a_config_that_needs_remote_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    root = tied_llama_run(tmp_path / "run")
    marker = tmp_path / "pwned"
    folder = root / "checkpoint-5"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_lm", auto_map={"AutoConfig": "evil.EvilConfig",
                                                    "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(EvaluatorError, match="without running code from the checkpoint"):
        load_evaluator(f"hf-lm:{root / 'val.txt'}", run=open_run(root))
    assert not marker.exists()


def test_the_cli_names_the_problem_and_exits_2(tmp_path: Path) -> None:
    root = tied_llama_run(tmp_path / "run", tokenizer=False)
    done = subprocess.run([sys.executable, "-m", "analysis", "recommend", str(root), "--eval", f"hf-lm:{root / 'val.txt'}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "hf-lm needs the tokenizer saved with the run" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_users_evaluator_gets_the_checkpoints_own_key_names(tmp_path: Path) -> None:
    # Every key of a tied-embedding Llama starts with "model.", which the readers strip to compare
    # checkpoints; the evaluator protocol promises the checkpoint's own names, which load_state_dict needs.
    from safetensors.torch import load_file

    from analysis.evaluate import Evaluator

    run = open_run(tied_llama_run(tmp_path / "run"))
    saved = load_file(str(tmp_path / "run" / "checkpoint-5" / "model.safetensors"))
    assert all(k.startswith("model.") for k in saved)
    seen: list[set[str]] = []
    Evaluator(lambda sd: seen.append(set(sd)) or 0.0, "keys").score(run.checkpoints, (1.0,))
    assert seen == [set(saved)]


def test_hf_lm_scores_are_cached_under_the_text_config_and_tokenizer(tmp_path: Path) -> None:
    root = tied_llama_run(tmp_path / "run")
    run = open_run(root)
    spec = f"hf-lm:{root / 'val.txt'}"
    first = load_evaluator(spec, run=run, max_tokens=200)
    first.persist(tmp_path / "scores")
    score = first.score(run.checkpoints, (1.0,))
    again = load_evaluator(spec, run=run, max_tokens=200)
    again.persist(tmp_path / "scores")
    assert again.score(run.checkpoints, (1.0,)) == score and again.from_store == 1
    (root / "val.txt").write_text(LLAMA_TEXT[::-1])   # another text: another identity, scored afresh
    changed = load_evaluator(spec, run=run, max_tokens=200)
    changed.persist(tmp_path / "scores")
    assert changed.score(run.checkpoints, (1.0,)) != score and changed.from_store == 0
    fewer = load_evaluator(spec, run=run, max_tokens=100)   # another budget too
    assert fewer.identity != changed.identity
