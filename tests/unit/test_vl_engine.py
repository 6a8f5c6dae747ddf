"""The vision-language engine (the transformers scheduler with images) on the smoke
detector: equal to transformers' own ``generate``, equal batched and alone, and the image
really reaches the model."""

import asyncio
import io

import pytest
import torch
from PIL import Image

from serve_apps.engines.base import Constraint, GenerationRequest, SamplingParams
from serve_apps.engines.detection import build_prompt, detection_grammar, parse_prediction
from serve_apps.errors import InvalidRequestError
from tests.helpers import scene_png


def image(seed, w=160, h=120):
    return Image.open(io.BytesIO(scene_png(w, h, seed=seed))).convert("RGB")


IMAGES = [image(0), image(1, 64, 200), image(2, 300, 90)]


def prompt(engine, text="Detect person, car. Output the bounding box coordinates.", n=1):
    content = [{"type": "image"}] * n + [{"type": "text", "text": text}]
    return engine.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant"},
         {"role": "user", "content": content}]
    )  # fmt: skip


def greedy(engine, images, n=20, text=None, **sampling):
    return GenerationRequest(
        prompt(engine, n=len(images)) if text is None else text,
        SamplingParams(max_tokens=n, temperature=0.0, skip_special_tokens=False, **sampling),
        images=list(images),
        add_special_tokens=False,
    )


@pytest.fixture(scope="module")
def hf(smoke_vl_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(smoke_vl_dir)
    model = AutoModelForImageTextToText.from_pretrained(smoke_vl_dir).eval()
    return processor, model


def hf_generate(hf, text, images, n, **kwargs):
    processor, model = hf
    inputs = processor(text=[text], images=images, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


async def test_equals_transformers_generate(smoke_vl_engine, hf):
    """Explicit multimodal RoPE positions and image features give generate()'s tokens."""
    for img in IMAGES[:2]:
        request = greedy(smoke_vl_engine, [img], n=24)
        ours = (await smoke_vl_engine.generate_full(request)).token_ids
        assert ours == hf_generate(hf, request.prompt, [img], 24)
        assert len(set(ours)) > 3  # a varied sequence, not one token repeated


async def test_repetition_penalty_equals_transformers(smoke_vl_engine, hf):
    request = greedy(smoke_vl_engine, [IMAGES[0]], n=24, repetition_penalty=1.3)
    ours = (await smoke_vl_engine.generate_full(request)).token_ids
    assert ours == hf_generate(hf, request.prompt, [IMAGES[0]], 24, repetition_penalty=1.3)
    plain = await smoke_vl_engine.generate_full(greedy(smoke_vl_engine, [IMAGES[0]], n=24))
    assert plain.token_ids != ours  # the penalty changed something


async def test_the_image_reaches_the_model(smoke_vl_engine):
    a, b = [
        (await smoke_vl_engine.generate_full(greedy(smoke_vl_engine, [img], n=16))).token_ids
        for img in IMAGES[:2]
    ]
    assert a != b


async def test_batched_generation_with_images_equals_generation_alone(smoke_vl_engine):
    """Requests with different image sizes, and one without an image, join a running
    batch (left padding, cache merge, per-row RoPE offsets) and change no token."""
    requests = [
        lambda: greedy(smoke_vl_engine, [IMAGES[0]], n=24),
        lambda: greedy(smoke_vl_engine, [IMAGES[1]], n=21),
        lambda: greedy(smoke_vl_engine, [], n=18, text=prompt(smoke_vl_engine, "hello", n=0)),
        lambda: greedy(smoke_vl_engine, [IMAGES[2], IMAGES[0]], n=15),
    ]
    alone = [(await smoke_vl_engine.generate_full(make())).token_ids for make in requests]

    async def staggered(i, make):
        await asyncio.sleep(0.005 * i)  # later ones join while earlier ones decode
        return (await smoke_vl_engine.generate_full(make())).token_ids

    def shared_steps():
        return sum(n for size, n in smoke_vl_engine.stats()["batch_sizes"].items() if size > 1)

    before = shared_steps()
    together = await asyncio.gather(*(staggered(i, m) for i, m in enumerate(requests)))
    assert together == alone
    assert shared_steps() > before  # they did share decode steps


async def test_detection_grammar_constrains_the_vision_model(smoke_vl_engine):
    categories = ["person", "car"]
    grammar = detection_grammar(
        categories, "detection", smoke_vl_engine.info().special_tokens, max_shapes=2
    )
    out = await smoke_vl_engine.generate_full(
        GenerationRequest(
            prompt=prompt(smoke_vl_engine, build_prompt("detection", categories)),
            sampling=SamplingParams(max_tokens=60, temperature=0.0, skip_special_tokens=False),
            constraint=Constraint("grammar", grammar),
            images=[IMAGES[0]],
            add_special_tokens=False,
        )
    )
    assert out.text.startswith("<|object_ref_start|>")
    parsed = parse_prediction(out.text, *IMAGES[0].size)
    assert parsed and set(parsed) <= set(categories)
    if out.finish_reason == "stop":
        assert out.constraint_satisfied is True
        assert all(s["type"] == "box" for shapes in parsed.values() for s in shapes)


@pytest.mark.parametrize(
    "grids",
    [
        lambda thw: thw[:0],  # fewer grids than image token runs: StopIteration inside
        lambda thw: None,  # no grids at all: TypeError inside
    ],
)
async def test_image_tokens_the_rope_index_cannot_place_are_a_400(
    smoke_vl_engine, monkeypatch, grids
):
    """transformers' own get_rope_index, given image inputs that do not match the ids,
    fails; that is the request's fault (400), and the engine keeps serving."""
    real = smoke_vl_engine._rope_index

    def mismatched(input_ids, *, mm_token_type_ids, image_grid_thw):
        return real(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=grids(image_grid_thw)
        )

    monkeypatch.setattr(smoke_vl_engine, "_rope_index", mismatched)
    with pytest.raises(InvalidRequestError) as info:
        # (a StopIteration escaping the worker thread used to leave the request hanging)
        await asyncio.wait_for(
            smoke_vl_engine.generate_full(greedy(smoke_vl_engine, [IMAGES[0]], n=4)), 60
        )
    assert info.value.code == "invalid_image"
    monkeypatch.undo()
    out = await smoke_vl_engine.generate_full(greedy(smoke_vl_engine, [IMAGES[0]], n=4))
    assert out.completion_tokens == 4 or out.finish_reason == "stop"
