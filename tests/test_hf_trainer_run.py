"""A run written by the real Hugging Face Trainer, end to end: discovery, logs, Adam state, recommend, merge.

The other HF tests build ``checkpoint-N/`` folders by hand in the Trainer's layout; this one lets
``transformers.Trainer`` write them (with its ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and
``training_args.bin``, the last two pickles CkptSelect must never load), trained for a minute on
the Python standard library's sources, so a change in what the Trainer writes shows up here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analysis.selection import RecommendConfig, recommend
from analysis.run import open_run
from analysis.signals import assess_run
from ckpt_factories import ByteChunks, byte_tokenizer, sqrt_second_moments, stdlib_bytes
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hf_trainer_run")]

CONTEXT = 64
STEPS = 60
EVERY = 10
LR = 3e-3

EVALUATOR = '''"""Mean next-byte loss of a GPT-2 state dict on the held-out bytes next to this file."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

DATA = torch.load(__file__.replace("evaluate.py", "val_bytes.pt"), weights_only=True)
CONFIG = GPT2Config.from_pretrained(__file__.replace("evaluate.py", "model_config"))


def evaluate(state_dict):
    model = GPT2LMHeadModel(CONFIG)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected   # tied to the embedding: not saved
    model.tie_weights()
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=DATA, labels=DATA).loss)
'''


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``output_dir`` of a 60-step Trainer run at a constant LR: checkpoint-10 ... checkpoint-60, eval every 10."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator

    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hf_trainer") / "output"
    data = stdlib_bytes(200_000)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    args = TrainingArguments(output_dir=str(root), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=LR,
                             lr_scheduler_type="constant", eval_strategy="steps", eval_steps=EVERY, save_steps=EVERY,
                             logging_steps=5, per_device_eval_batch_size=32, report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=ByteChunks(data[:180_000], CONTEXT),
                eval_dataset=ByteChunks(data[180_000:], CONTEXT), processing_class=byte_tokenizer(),
                data_collator=default_data_collator).train()
    # The user's evaluator: loss on bytes the Trainer never saw, through the model class it trained.
    held_out = stdlib_bytes(200_000 + 32 * CONTEXT)[200_000:].reshape(32, CONTEXT)
    torch.save(held_out, root / "val_bytes.pt")
    (root / "val.txt").write_bytes(bytes(held_out.reshape(-1).tolist()))
    config.save_pretrained(root / "model_config")
    (root / "evaluate.py").write_text(EVALUATOR)
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_trainer_checkpoints_logs_and_adam_state_are_read(hf_run: Path) -> None:
    run = open_run(hf_run)
    steps = list(range(EVERY, STEPS + 1, EVERY))
    assert [c.step for c in run.checkpoints] == steps and {c.layout for c in run.checkpoints} == {"hf_folder"}
    history = json.loads((hf_run / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    signals = assess_run(run)
    assert [(c.ref.step, c.val.value, c.val.source) for c in signals.checkpoints] == [
        (s, pytest.approx(evals[s], abs=1e-12), "logged") for s in steps]
    assert all(c.lr == pytest.approx(LR) and not c.lr_saved and c.eligible for c in signals.checkpoints)
    optimizer = torch.load(hf_run / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)
    sqrt_v_sum, elements = sqrt_second_moments(optimizer)
    assert signals.noise is not None and signals.noise.step == STEPS
    assert signals.noise.sqrt_v_sum == pytest.approx(sqrt_v_sum, rel=1e-9) and signals.noise.elements == elements
    rec = recommend(signals, RecommendConfig())
    corrected = sqrt_v_sum / math.sqrt(1 - 0.999 ** STEPS)   # Adam's bias correction, the Trainer's β2 (issue 21)
    assert rec.iterate_noise == pytest.approx(LR * corrected / 4, rel=1e-9)
    assert (signals.noise.adam_step, signals.noise.adam_step_source) == (STEPS, "optimizer state")
    assert rec.checkpoints[-1].step == STEPS and math.isclose(sum(rec.weights), 1.0)


def test_recommend_with_the_users_evaluator_then_merge_gives_a_model_transformers_loads(hf_run: Path,
                                                                                       tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    recipe = tmp_path / "recipe.yaml"
    done = _cli("recommend", str(hf_run), "--eval", f"{hf_run / 'evaluate.py'}:evaluate", "--max-evals", "8",
                "-o", str(recipe), "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["evaluations"] <= 8 and doc["score"] <= doc["last_score"]
    merged = tmp_path / "merged"
    done = _cli("merge", str(recipe), "-o", str(merged), "--json")
    assert done.returncode == 0, done.stderr
    # The merged folder is a model transformers loads, whose weights are the recipe's average...
    taken = [(c["path"], c["weight"]) for c in doc["checkpoints"]]
    states = [load_file(str(Path(path) / "model.safetensors")) for path, _ in taken]
    model = GPT2LMHeadModel.from_pretrained(merged)
    for name, tensor in model.state_dict().items():
        if name in states[0]:
            expected = sum(w * s[name].float() for (_, w), s in zip(taken, states))
            torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    # ... and scores what the recommendation said it would.
    spec = importlib.util.spec_from_file_location("users_evaluator", hf_run / "evaluate.py")
    users_evaluator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(users_evaluator)
    assert users_evaluator.evaluate(load_file(str(merged / "model.safetensors"))) == pytest.approx(doc["score"], abs=1e-5)


def test_the_built_in_hf_lm_evaluator_scores_the_runs_model_on_a_text_file(hf_run: Path, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    # Byte-level tokens: the text's bytes are its ids, so the loss can be computed here independently.
    done = _cli("recommend", str(hf_run), "--eval", f"hf-lm:{hf_run / 'val.txt'}", "--eval-tokens", "1000",
                "--max-evals", "6", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["evaluations"] <= 6 and doc["score"] <= doc["last_score"]
    ids = torch.tensor(list((hf_run / "val.txt").read_bytes())[:1001])
    model = GPT2LMHeadModel.from_pretrained(hf_run / f"checkpoint-{STEPS}").eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, 1000, CONTEXT - 1):   # blocks of the context overlapping by one token
            block = ids[start:start + CONTEXT][None]
            logits = model(input_ids=block).logits
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], block[0, 1:], reduction="sum"))
    assert doc["last_score"] == pytest.approx(total / 1000, abs=1e-5)
    assert "hf-lm:val.txt (1,000 tokens)" in doc["summary"]
