"""The embedded smoke models: real architectures with random weights, built from a fixed seed.

Nothing can be downloaded where this project is developed and tested, so the default
configuration serves models that the project builds itself on first use:

- **smoke LLM**: a byte-level BPE tokenizer trained on ``smoke_corpus.txt`` (shipped in
  the package) with Qwen's special tokens and a ChatML chat template, and a small
  ``Qwen2ForCausalLM`` (the architecture of Qwen2.5 instruct models);
- **smoke detector**: a small ``Qwen2_5_VLForConditionalGeneration`` (the architecture
  of Rex-Omni) with a locally built ``Qwen2_5_VLProcessor``: the same kind of tokenizer
  plus Rex-Omni's coordinate tokens ``<0>``..``<999>``, Qwen2-VL's image processor (with
  a small pixel budget, for CPU speed) and Qwen2.5-VL's chat template;
- **smoke LoRA adapter**: a PEFT LoRA (rank 8 on every attention and MLP projection) of
  the smoke LLM, saved with ``save_pretrained`` like a fine-tuned adapter; its ``B``
  matrices are drawn non-zero (a fresh LoRA's are zero), so the adapter changes outputs;
- **smoke SAM checkpoint**: a segment-anything model with a 2-block ViT image encoder
  (the ``smoke`` type of :func:`serve_apps.engines.segmenter.sam_builders`), saved as a
  ``state_dict`` file like the official ``sam_vit_*.pth`` checkpoints.

Weights are drawn from ``torch.manual_seed(seed)``. The models are written into the cache
directory (``save_pretrained`` / ``torch.save``) and then loaded through the very same
``from_pretrained(path)`` / ``checkpoint=`` code that loads real ones, so the serving path
is exercised end to end. Their output is well-formed and meaningless.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SMOKE_LLM_VERSION = 2
SMOKE_VL_VERSION = 1
SMOKE_SAM_VERSION = 1
SMOKE_LORA_VERSION = 1
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

# Rex-Omni's coordinate bins. Whether the real Rex-Omni tokenizer marks them special is
# not known here; the smoke tokenizer adds them as ordinary added tokens (one token each),
# and the detection grammar handles both cases (serve_apps/engines/detection.py).
COORD_TOKENS = [f"<{i}>" for i in range(1000)]

# Qwen2's pre-tokenizer regex (transformers/models/qwen2/tokenization_qwen2.py), so the
# smoke VL tokenizer splits text the way Qwen2Tokenizer does when it is reloaded.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-VL's chat template (chat_template.json of the Qwen2.5-VL instruct models).
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Pixel budget of the smoke processor: at most 64 patches of 28x28 (the image is resized
# to fit), so an image costs at most 64 prompt tokens on the CPU. Real Qwen2.5-VL
# processors allow up to 12845056 pixels; Rex-Omni serves with 2007040.
SMOKE_VL_MIN_PIXELS = 4 * 28 * 28
SMOKE_VL_MAX_PIXELS = 64 * 28 * 28

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


def train_vl_tokenizer(vocab_size: int = 2048):
    """The smoke detector's tokenizer: Qwen2Tokenizer's class and pre-tokenizer, trained on
    the bundled corpus, with Qwen's special tokens and Rex-Omni's coordinate tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in COORD_TOKENS])
    return Qwen2Tokenizer(
        tokenizer_object=tok,
        # Byte-level BPE never needs an unknown token; Qwen's tokenizer has none either.
        unk_token=None,  # type: ignore[arg-type]
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _smoke_vl_processor(tokenizer: Any) -> Any:
    """Qwen2-VL's patching (14-pixel patches, 2 frames, 2x2 merge) with a small budget."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    patching: dict[str, Any] = {
        "min_pixels": SMOKE_VL_MIN_PIXELS,
        "max_pixels": SMOKE_VL_MAX_PIXELS,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patching),
        video_processor=Qwen2VLVideoProcessor(**patching),
        tokenizer=tokenizer,
        chat_template=QWEN25_VL_CHAT_TEMPLATE,
    )


def _smoke_vl_config(tokenizer: Any, ids: dict[str, int], eos: list[int]) -> Any:
    """A 2-layer Qwen2.5-VL (2 vision blocks), Rex-Omni's architecture at toy size."""
    from transformers import Qwen2_5_VLConfig

    # Weights drawn wider than the usual 0.02: with that, a 2-layer random model emits one
    # token forever, and tests comparing batched with solo generation would then compare
    # nothing. At 0.1 greedy output varies token by token and depends on the image.
    init = 0.1
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": (len(tokenizer) + 63) // 64 * 64,  # padded rows, like Qwen's
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,  # head_dim 32
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # Qwen2.5-VL splits each head's rotary half (16 here) over time, height and
            # width in the ratio of the real models' [16, 24, 24].
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [4, 6, 6],
            },
            "bos_token_id": None,
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": True,
            "initializer_range": init,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "out_hidden_size": 128,
            "fullatt_block_indexes": [1],
            "initializer_range": init,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_smoke_vl(out_dir: Path, seed: int = DEFAULT_SEED) -> None:
    """Write the smoke detector (a Qwen2.5-VL model + processor) with ``save_pretrained``."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = train_vl_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    processor = _smoke_vl_processor(tokenizer)
    config = _smoke_vl_config(tokenizer, ids, eos)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        MODEL_CARD.format(seed=seed, arch="Qwen2_5_VLForConditionalGeneration")
    )


SMOKE_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_smoke_lora(out_dir: Path, seed: int = DEFAULT_SEED, *, base_dir: Path) -> None:
    """Write a smoke LoRA adapter of the smoke LLM at ``base_dir`` (PEFT ``save_pretrained``).

    A new LoRA's ``B`` is zero (the adapter starts as the identity); here ``A`` and ``B``
    are both drawn from ``seed`` so that the adapter, like a trained one, changes what the
    model says. The scale (std 0.2, alpha/r = 2) moves greedy outputs of the smoke model
    within a few tokens.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=SMOKE_LORA_TARGETS, bias="none"
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    (out_dir / "README.md").write_text(
        "# Smoke LoRA adapter (random weights)\n\n"
        f"Built by `serve_apps.engines.smoke` from seed {seed}: a PEFT LoRA (r=8) of the smoke "
        "LLM with random non-zero A and B. Its output differs from the base model's and is "
        "as meaningless.\n"
    )


SMOKE_SAM_FILE = "sam_smoke.pth"


def build_smoke_sam(out_dir: Path, seed: int = DEFAULT_SEED) -> None:
    """Write a smoke SAM checkpoint: a ``state_dict`` of CPU tensors, like the real files.

    segment-anything's builders ``torch.load`` the file without ``map_location``, so CPU
    tensors are what lets a machine without a GPU load it.
    """
    import torch

    from .segmenter import sam_builders

    torch.manual_seed(seed)
    sam = sam_builders()["smoke"]()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in sam.state_dict().items()}, out_dir / SMOKE_SAM_FILE)
    (out_dir / "README.md").write_text(
        "# Smoke SAM checkpoint (random weights)\n\n"
        f"Built by `serve_apps.engines.smoke` from seed {seed}: segment-anything's `Sam` with "
        "a 2-block, 64-wide ViT image encoder and the real prompt encoder and mask decoder, "
        "saved as a state_dict. Masks from it are meaningless.\n"
    )


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


def smoke_vl_path(cache_dir: Path, seed: int = DEFAULT_SEED) -> Path:
    """Path of the smoke detector (Qwen2.5-VL), building it on first use."""
    return ensure_built(f"smoke-vl-v{SMOKE_VL_VERSION}", build_smoke_vl, cache_dir, seed)


def smoke_lora_path(cache_dir: Path, seed: int = DEFAULT_SEED) -> Path:
    """Path of the smoke LoRA adapter of seed ``seed`` (of the smoke LLM), built on first use."""
    base_dir = smoke_llm_path(cache_dir)

    def build(out_dir: Path, seed: int) -> None:
        build_smoke_lora(out_dir, seed, base_dir=base_dir)

    return ensure_built(f"smoke-lora-v{SMOKE_LORA_VERSION}", build, cache_dir, seed)


def smoke_sam_checkpoint(cache_dir: Path, seed: int = DEFAULT_SEED) -> Path:
    """Path of the smoke SAM checkpoint file, building it on first use."""
    out = ensure_built(f"smoke-sam-v{SMOKE_SAM_VERSION}", build_smoke_sam, cache_dir, seed)
    return out / SMOKE_SAM_FILE
