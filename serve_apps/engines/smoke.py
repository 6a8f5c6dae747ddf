"""The embedded smoke model: a real architecture with random weights, built from a fixed seed.

Nothing can be downloaded where this project is developed and tested, so the default
configuration serves a model that the project builds itself on first use:

- a byte-level BPE tokenizer trained on ``smoke_corpus.txt`` (shipped in the package) with
  Qwen's special tokens and a ChatML chat template;
- a small ``Qwen2ForCausalLM`` (the architecture of Qwen2.5 instruct models) whose weights
  are drawn from ``torch.manual_seed(seed)``.

It is written with ``save_pretrained`` into the cache directory and then loaded through the
very same ``from_pretrained(path)`` code that loads a real model id, so the serving path is
exercised end to end. Its output is well-formed and meaningless.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

SMOKE_LLM_VERSION = 2
DEFAULT_SEED = 0

# Qwen2.5's special tokens (the VL ones included, so vision models can share the tokenizer).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MODEL_CARD = """# Smoke model (random weights)

Built by `serve_apps.engines.smoke` from seed {seed}: a `{arch}` with random weights and a
byte-level BPE tokenizer trained on the project's small corpus. It exists so that the serving
graph can run offline on a CPU. Its output is well-formed and meaningless.
"""


def corpus_text() -> str:
    return resources.files("serve_apps.engines").joinpath("smoke_corpus.txt").read_text()


def train_tokenizer(vocab_size: int = 2048, special_tokens: list[str] | None = None):
    """A byte-level BPE tokenizer trained on the bundled corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(special_tokens or SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def build_smoke_llm(out_dir: Path, seed: int = DEFAULT_SEED) -> None:
    """Write a smoke causal LM (model + tokenizer) to ``out_dir`` with ``save_pretrained``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer()
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        # head_dim 32: the smallest head size vLLM's CPU attention runs, so the vLLM
        # backend can serve this same model.
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(MODEL_CARD.format(seed=seed, arch="Qwen2ForCausalLM"))


def ensure_built(name: str, builder, cache_dir: Path, seed: int = DEFAULT_SEED) -> Path:
    """Build ``name`` into ``cache_dir`` once (across processes) and return its path.

    Replicas start concurrently, so the build happens under a file lock into a temporary
    directory that is renamed into place when complete: a reader never sees half a model.
    """
    from filelock import FileLock

    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{name}-seed{seed}"
    if (target / ".complete").exists():
        return target
    with FileLock(str(cache_dir / f"{name}.lock")):
        if (target / ".complete").exists():
            return target
        logger.info("building smoke model %s into %s", name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        try:
            builder(tmp, seed=seed)
            (tmp / ".complete").touch()
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def smoke_llm_path(cache_dir: Path, seed: int = DEFAULT_SEED) -> Path:
    """Path of the smoke causal LM, building it on first use."""
    return ensure_built(f"smoke-llm-v{SMOKE_LLM_VERSION}", build_smoke_llm, cache_dir, seed)
