"""The SAM engine on the smoke model: loading through ``checkpoint=``, batched box decoding
equal to segment-anything's per-box predictor, the embedding cache and request batching."""

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from serve_apps.engines.segmenter import Segmenter, sam_builders
from serve_apps.errors import InvalidRequestError
from tests.helpers import scene_png

BOXES = [[10, 10, 120, 90], [60, 20, 150, 110], [0, 0, 160, 120], [70, 50, 80, 60]]


@pytest.fixture(scope="module")
async def segmenter(smoke_sam_checkpoint):
    seg = Segmenter("smoke", str(smoke_sam_checkpoint), cache_size=4, batch_wait_s=0.05)
    await seg.start()
    yield seg
    await seg.shutdown()


def test_a_checkpoint_the_test_writes_loads_through_checkpoint(tmp_path):
    torch.manual_seed(123)
    reference = sam_builders()["smoke"]()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    path = tmp_path / "sam_test.pth"
    torch.save(state, path)

    seg = Segmenter("smoke", str(path), device="cpu")
    seg.load()
    loaded = seg.model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    # Strict loading, like any real checkpoint: a file that does not fit is an error.
    del state["mask_decoder.iou_prediction_head.layers.0.weight"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        Segmenter("smoke", str(path), device="cpu").load()


@pytest.mark.parametrize("decoder_batch_size", [len(BOXES), 1])
async def test_batched_box_decoding_equals_the_per_box_predictor(segmenter, decoder_batch_size):
    """All boxes in one decoder call (the GPU default) and one per call (the CPU default)
    give segment-anything's own per-box result."""
    from segment_anything import SamPredictor

    image = scene_png(160, 120, seed=1)
    default = segmenter.decoder_batch_size
    segmenter.decoder_batch_size = decoder_batch_size
    try:
        out = await segmenter.segment(image, BOXES)
    finally:
        segmenter.decoder_batch_size = default
    assert len(out.results) == len(BOXES) and out.image_size == (160, 120)

    predictor = SamPredictor(segmenter.model)
    predictor.set_image(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))
    for box, result in zip(BOXES, out.results, strict=True):
        masks, scores, _ = predictor.predict(box=np.array(box), multimask_output=False)
        from serve_apps.engines.segmenter import mask_to_polygons

        assert result.area == int(masks[0].sum())
        assert result.polygons == mask_to_polygons(masks[0])
        assert result.score == pytest.approx(float(scores[0]), abs=1e-5)


async def test_the_embedding_cache_skips_the_encoder(segmenter):
    image = scene_png(160, 120, seed=2)
    before = segmenter.stats()["encoded_images"]
    first = await segmenter.segment(image, BOXES[:2])
    second = await segmenter.segment(image, BOXES[:2])
    assert not first.cache_hit and second.cache_hit
    assert segmenter.stats()["encoded_images"] == before + 1
    assert second.timings_ms["encode"] == 0.0
    assert [r.polygons for r in first.results] == [r.polygons for r in second.results]
    encoded = await segmenter.encode(image)
    assert encoded.cache_hit and encoded.image_size == (160, 120)


async def test_the_cache_is_bounded_least_recently_used_first(segmenter):
    images = [scene_png(64, 48, seed=100 + i) for i in range(5)]  # cache_size is 4
    for image in images:
        await segmenter.encode(image)
    assert (await segmenter.encode(images[-1])).cache_hit
    assert not (await segmenter.encode(images[0])).cache_hit
    assert segmenter.stats()["cached_embeddings"] == 4


async def test_concurrent_encodings_share_encoder_calls_and_match_solo_ones(segmenter):
    images = [scene_png(96, 72, seed=200 + i) for i in range(3)]
    sizes_before = dict(segmenter.stats()["encoder_batch_sizes"])
    await asyncio.gather(*(segmenter.encode(i) for i in images))
    sizes_after = segmenter.stats()["encoder_batch_sizes"]
    grew = {k: sizes_after.get(k, 0) - sizes_before.get(k, 0) for k in sizes_after}
    assert sum(k * v for k, v in grew.items()) == 3
    assert any(k > 1 and v > 0 for k, v in grew.items()), grew  # at least one shared call

    from serve_apps.images import image_key

    batched = [segmenter._cache[image_key(i)].features for i in images]
    solo = [segmenter._encode_batch([segmenter._pixels(i)])[0].features for i in images]
    for a, b in zip(batched, solo, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


async def test_concurrent_requests_for_one_image_encode_it_once(segmenter):
    image = scene_png(80, 60, seed=300)
    before = segmenter.stats()["encoded_images"]
    results = await asyncio.gather(*(segmenter.segment(image, BOXES[:1]) for _ in range(3)))
    assert segmenter.stats()["encoded_images"] == before + 1
    assert sum(not r.cache_hit for r in results) == 1
    assert len({tuple(map(tuple, r.results[0].polygons)) for r in results}) == 1


async def test_a_cancelled_request_does_not_fail_another_waiting_for_the_same_image(segmenter):
    image = scene_png(80, 60, seed=400)
    first = asyncio.ensure_future(segmenter.segment(image, BOXES[:1]))
    await asyncio.sleep(0)  # the first request starts the encoding
    second = asyncio.ensure_future(segmenter.segment(image, BOXES[:1]))
    await asyncio.sleep(0)
    first.cancel()
    out = await second
    assert len(out.results) == 1


async def test_an_encoding_nobody_waits_for_any_more_is_dropped(segmenter):
    image = scene_png(80, 60, seed=500)
    request = asyncio.ensure_future(segmenter.segment(image, BOXES[:1]))
    await asyncio.sleep(0)  # the encoding is started
    assert len(segmenter._inflight) == 1
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert segmenter._inflight == {}  # its only waiter went: the encoding went too
    out = await segmenter.segment(image, BOXES[:1])  # the same image encodes anew
    assert len(out.results) == 1 and out.cache_hit is False


def test_the_decoder_batch_follows_the_device(segmenter):
    assert segmenter.device.type == "cpu" and segmenter.decoder_batch_size == 1


async def test_boxes_are_clipped_and_ordered_and_too_many_are_refused(segmenter):
    image = scene_png(160, 120, seed=1)
    out = await segmenter.segment(image, [[150, 200, -20, 10]])
    assert out.results[0].box == [0.0, 10.0, 150.0, 120.0]
    segmenter.max_boxes = 2
    try:
        with pytest.raises(InvalidRequestError):
            await segmenter.segment(image, BOXES)
    finally:
        segmenter.max_boxes = 256
    assert (await segmenter.segment(image, [])).results == []
