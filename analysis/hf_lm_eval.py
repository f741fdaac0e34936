"""The built-in evaluator ``--eval hf-lm:VAL.txt``: a Hugging Face causal LM's loss on a text file.

For runs saved as Hugging Face folders (``config.json`` next to the weights, a tokenizer saved with
the checkpoint or once in the run folder) a user need not write an evaluator: the candidate average
is loaded into the architecture its ``config.json`` names and scored as the mean next-token loss
(nats per token) over the first ``max_tokens`` tokens of the text, cut into blocks of the model's
context length (at most 1024). It keeps the evaluator protocol: a function of a state dict, lower
is better.

Nothing runs that the user did not install: configs and tokenizers are read with
``local_files_only=True`` and ``trust_remote_code=False`` (a model whose config asks for remote code
is refused with a message), and nothing is downloaded. The model is built with its parameters on
the ``meta`` device and the candidate's tensors are assigned into it (buffers such as rotary frequencies are built for
real), so no random initialisation is paid and no second copy of the weights is made; weights tied to the input embedding (``lm_head.weight`` of GPT-2 and
Llama with tied embeddings), which Hugging Face does not save, are tied again.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from .errors import EvaluatorError
from .score_store import file_digest

if TYPE_CHECKING:
    import torch

    from .run import Run

PREFIX = "hf-lm:"
DEFAULT_MAX_TOKENS = 65_536
MAX_BLOCK = 1024
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Every file a saved tokenizer may read: what the --eval-cache identity hashes.
_TOKENIZER_INPUTS = (*_TOKENIZER_FILES, "merges.txt", "vocab.txt", "spiece.model", "special_tokens_map.json",
                     "added_tokens.json", "chat_template.jinja")


def is_hf_lm_spec(spec: str) -> bool:
    """True for ``hf-lm:PATH`` (the built-in evaluator), False for a user's ``FILE.py:FUNC``."""
    return spec.startswith(PREFIX)


def hf_lm_scorer(spec: str, run: Run | None, max_tokens: int = DEFAULT_MAX_TOKENS,
                 device: str | None = None) -> tuple[Callable[[dict[str, torch.Tensor]], float], str, str]:
    """(score function, name, identity) of ``hf-lm:VAL.txt`` for ``run``'s model.

    The identity covers everything a score depends on but the weights: the text, the config and the
    tokenizer files (their bytes), the token budget and the device (for ``--eval-cache``).

    Raises:
        EvaluatorError: no text file, transformers missing, no config.json or tokenizer in the run's newest
            checkpoint folder or the run folder, a config that needs remote code, or too little text.
    """
    text_path = Path(spec[len(PREFIX):]).expanduser()
    if not text_path.is_file():
        raise EvaluatorError(f"{text_path}: hf-lm needs a text file to score on, and there is none there")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise EvaluatorError("hf-lm needs transformers: pip install 'ckpt-select[hf]'") from None
    config_dir, tokenizer_dir = _config_and_tokenizer_dirs(run)
    model_source = _ModelSource(config_dir, device)
    blocks = _token_blocks(text_path, tokenizer_dir, max_tokens, model_source.context)

    def score(state_dict: dict[str, torch.Tensor]) -> float:
        return model_source.mean_loss(state_dict, blocks)

    inputs = [text_path, config_dir / "config.json"] + sorted(
        f for f in tokenizer_dir.iterdir() if f.is_file() and f.name in _TOKENIZER_INPUTS)
    identity = f"hf-lm:{file_digest(inputs)}:{max_tokens}:{model_source.device}"
    return score, f"hf-lm:{text_path.name} ({sum(b.numel() - 1 for b in blocks):,} tokens)", identity


def _config_and_tokenizer_dirs(run: Run | None) -> tuple[Path, Path]:
    """The folders holding the run's ``config.json`` and its saved tokenizer (the same one, usually).

    Raises:
        EvaluatorError: either is missing, with where it was looked for and how to save it.
    """
    folders = _model_folders(run)
    config_dir = next((f for f in folders if (f / "config.json").is_file()), None)
    if config_dir is None:
        raise EvaluatorError("hf-lm needs a config.json (a Hugging Face checkpoint folder) in the run's newest "
                             f"checkpoint or the run folder; looked in {', '.join(str(f) for f in folders) or 'none'}")
    tokenizer_dir = next((f for f in folders if any((f / n).is_file() for n in _TOKENIZER_FILES)), None)
    if tokenizer_dir is None:
        raise EvaluatorError(f"hf-lm needs the tokenizer saved with the run (tokenizer.json or tokenizer_config.json "
                             f"in {config_dir} or the run folder): pass processing_class=tokenizer to the Trainer, "
                             f"or call tokenizer.save_pretrained(output_dir)")
    return config_dir, tokenizer_dir


def model_files(run: Run | None) -> list[Path]:
    """Every config or tokenizer file hf-lm may read for ``run`` (those present): ``ui --root`` checks them."""
    return [folder / name for folder in _model_folders(run) for name in ("config.json", *_TOKENIZER_INPUTS)
            if (folder / name).exists() or (folder / name).is_symlink()]


def _model_folders(run: Run | None) -> list[Path]:
    """Where the config and tokenizer may be: the newest checkpoint's folder first, then the run folder."""
    if run is None:
        return []
    folders: list[Path] = []
    if run.checkpoints:
        newest = run.checkpoints[-1].path
        folders.append(newest if newest.is_dir() else newest.parent)
    if run.path.is_dir() and run.path not in folders:
        folders.append(run.path)
    return folders


class _ModelSource:
    """The run's architecture, built once on the meta device; candidates are assigned into a fresh copy."""

    def __init__(self, config_dir: Path, device: str | None) -> None:
        import torch
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(config_dir, local_files_only=True, trust_remote_code=False)
        except ValueError as e:   # a custom architecture that only remote code defines
            raise EvaluatorError(f"{config_dir / 'config.json'}: hf-lm cannot build this model without running "
                                 f"code from the checkpoint, which CkptSelect never does ({e}); write an evaluator "
                                 f"(--eval FILE.py:FUNC) that imports your model class instead") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        positions = int(getattr(self.config, "max_position_embeddings", 0) or getattr(self.config, "n_positions", 0)
                        or MAX_BLOCK)
        self.context = max(2, min(positions, MAX_BLOCK))   # a block predicts context - 1 tokens
        self.config_dir = config_dir

    def _model(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        import torch
        from transformers import AutoModelForCausalLM

        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(self.config, trust_remote_code=False)
        dtype = torch.float32 if self.device == "cpu" else None   # CPU matmuls in bf16 are slow and coarse
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state_dict.items()}
        _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        model.tie_weights()
        missing = sorted(n for n, p in model.named_parameters() if p.is_meta)
        if unexpected or missing:
            raise EvaluatorError(f"the checkpoint's tensors do not fit the model {self.config_dir / 'config.json'} "
                                 f"describes: missing {missing[:4]}, unexpected {sorted(unexpected)[:4]}")
        return model.to(self.device).eval()

    def mean_loss(self, state_dict: dict[str, torch.Tensor], blocks: Sequence[torch.Tensor]) -> float:
        """Mean next-token cross-entropy (nats) over every predicted token of ``blocks``."""
        import torch

        model = self._model(state_dict)
        total, count = 0.0, 0
        with torch.no_grad():
            for block in blocks:
                ids = block[None].to(self.device)
                logits = model(input_ids=ids).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
                total += float(loss)
                count += ids.shape[1] - 1
        if not math.isfinite(total):
            raise EvaluatorError("hf-lm: the candidate's loss is not finite")
        return total / count


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers on the CPU.

    Parameters are replaced by the candidate's tensors anyway, so allocating and initialising them
    would cost a model's memory and seconds for nothing; buffers that are not saved (rotary
    frequencies, attention masks) are computed from the config in ``__init__`` and must be real.
    Each parameter exists for a moment at its real size before it moves: one tensor, not a model.
    """
    import torch

    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register   # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original   # type: ignore[method-assign]


def _token_blocks(text_path: Path, tokenizer_dir: Path, max_tokens: int, context: int) -> list[torch.Tensor]:
    """The text's first ``max_tokens`` + 1 tokens, in blocks of ``context`` that overlap by one token.

    Overlapping by one makes every token but the first a prediction target exactly once.
    """
    import torch
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise EvaluatorError(f"{tokenizer_dir}: hf-lm could not load the tokenizer saved there ({e})") from None
    text = text_path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text[: max(64, 32 * (max_tokens + 1))], add_special_tokens=False,
                    verbose=False)["input_ids"][: max_tokens + 1]
    if len(ids) < 2:
        raise EvaluatorError(f"{text_path}: hf-lm needs at least two tokens of text, found {len(ids)}")
    tensor = torch.tensor(ids, dtype=torch.long)
    step = context - 1
    return [tensor[start:start + context] for start in range(0, len(ids) - 1, step)]
