"""The smoke detector (Qwen2.5-VL architecture) on vLLM (opt-in lane: scripts/test-vllm).

The HTTP contract of the vision routes runs on the vLLM targets too (the detector there is
this engine); these check what is specific to passing images to vLLM: the engine really
is vLLM's with spawned workers, an image's tokens are counted before vLLM sees the request,
exactly as the transformers engine counts them, and the image reaches the model.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from serve_apps.engines.base import GenerationRequest, SamplingParams
from serve_apps.errors import ContextLengthError
from tests.helpers import scene_png

pytestmark = pytest.mark.vllm

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect cat."}]},
]


def image(seed: int) -> Image.Image:
    return Image.open(io.BytesIO(scene_png(160, 120, seed=seed))).convert("RGB")


def greedy(engine, images, max_tokens=12) -> GenerationRequest:
    return GenerationRequest(
        engine.apply_chat_template(MESSAGES),
        SamplingParams(max_tokens=max_tokens, temperature=0, skip_special_tokens=False),
        images=images,
        add_special_tokens=False,
    )


@pytest.fixture(scope="module")
async def transformers_vl_engine(smoke_vl_dir):
    from serve_apps.engines.transformers_vl import TransformersVLEngine

    engine = TransformersVLEngine(str(smoke_vl_dir), dtype="float32", device="cpu")
    await engine.start()
    yield engine
    await engine.shutdown()


async def test_the_detector_engine_is_vllms_with_spawned_workers(smoke_vllm_vl_engine):
    from serve_apps.engines.vllm_vl import VLLMVLEngine

    assert type(smoke_vllm_vl_engine) is VLLMVLEngine
    info = smoke_vllm_vl_engine.info()
    assert info.supports_images
    assert "<|box_start|>" in info.special_tokens  # the grammar names it as a token
    assert smoke_vllm_vl_engine.stats()["worker_multiproc_method"] == "spawn"


async def test_image_tokens_are_counted_before_vllm_as_on_transformers(
    smoke_vllm_vl_engine, transformers_vl_engine
):
    picture = image(1)
    ours = await smoke_vllm_vl_engine.generate_full(greedy(smoke_vllm_vl_engine, [picture]))
    theirs = await transformers_vl_engine.generate_full(greedy(transformers_vl_engine, [picture]))
    assert ours.prompt_tokens == theirs.prompt_tokens
    text_only = len(
        smoke_vllm_vl_engine.tokenizer(greedy(smoke_vllm_vl_engine, []).prompt).input_ids
    )
    assert ours.prompt_tokens > text_only  # the placeholder was expanded to the image's patches
    # A budget the unexpanded prompt would fit in, the image's tokens do not: refused first.
    context = smoke_vllm_vl_engine.info().max_model_len
    with pytest.raises(ContextLengthError):
        await smoke_vllm_vl_engine.generate_full(
            greedy(smoke_vllm_vl_engine, [picture], max_tokens=context - text_only)
        )


async def test_the_image_reaches_the_model(smoke_vllm_vl_engine):
    """Different images, different greedy answers (the smoke detector's weights make its
    output depend on the image); the same image, the same answer."""
    outs = [
        (
            await smoke_vllm_vl_engine.generate_full(greedy(smoke_vllm_vl_engine, [image(s)]))
        ).token_ids
        for s in (1, 2, 3, 1)
    ]
    assert outs[0] == outs[3]
    assert len({tuple(o) for o in outs}) > 1
