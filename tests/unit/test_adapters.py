"""LoRA adapters on the transformers backend (PEFT), against PEFT's own results.

The smoke adapters are real PEFT LoRAs of the smoke LLM (random non-zero weights, built
from a seed); the engine must give, for a request on an adapter, exactly what PEFT's
merged model gives greedily, whether the request runs alone or in a batch with requests
for other adapters and for the base model.
"""

from __future__ import annotations

import asyncio

import pytest

from serve_apps.config import AdapterConfig, ModelConfig
from serve_apps.engines.adapters import AdapterSource
from serve_apps.engines.base import GenerationRequest, SamplingParams
from serve_apps.errors import ModelNotFoundError

PROMPTS = ["the cat sat on", "a quick brown fox", "serve the model", "one two three"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def lora_dirs(settings):
    from serve_apps.engines.smoke import smoke_lora_path

    return {f"lora-{seed}": smoke_lora_path(settings.cache_dir, seed) for seed in (0, 1, 2, 3)}


def sources(lora_dirs, names):
    return {n: AdapterSource(n, str(lora_dirs[n])) for n in names}


@pytest.fixture(scope="module")
async def lora_engine(smoke_llm_dir, lora_dirs):
    """An engine with four adapters, all of them loadable at once."""
    from serve_apps.engines.transformers_llm import TransformersEngine

    engine = TransformersEngine(
        str(smoke_llm_dir),
        max_batch_size=8,
        adapters=sources(lora_dirs, lora_dirs),
        max_loaded_adapters=4,
    )
    await engine.start()
    yield engine
    await engine.shutdown()


def greedy(prompt: str, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        adapter=adapter,
    )


def peft_merged_greedy(smoke_llm_dir, lora_dir, prompt: str) -> list[int]:
    """Greedy ids from PEFT's merged model (base + LoRA folded into the weights), with
    the full sequence recomputed every step: no cache, no batching, no adapter_names."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smoke_llm_dir)
    base = AutoModelForCausalLM.from_pretrained(smoke_llm_dir)
    merged = PeftModel.from_pretrained(base, str(lora_dir)).merge_and_unload().eval()
    eos = set(merged.generation_config.eos_token_id)
    ids = tokenizer(prompt).input_ids
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(MAX_TOKENS):
            logits = merged(input_ids=torch.tensor([ids + out])).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            if token in eos:
                break
    return out


async def test_smoke_adapter_is_a_real_peft_lora_with_nonzero_weights(lora_dirs):
    import json

    from safetensors.torch import load_file

    lora = lora_dirs["lora-0"]
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    weights = load_file(str(lora / "adapter_model.safetensors"))
    b = [w for name, w in weights.items() if "lora_B" in name]
    assert b and all(float(w.abs().sum()) > 0 for w in b)


async def test_adapter_greedy_output_equals_peft_merged_model(
    lora_engine, smoke_llm_dir, lora_dirs
):
    for name in ("lora-0", "lora-1"):
        out = await lora_engine.generate_full(greedy(PROMPTS[0], name))
        assert out.token_ids == peft_merged_greedy(smoke_llm_dir, lora_dirs[name], PROMPTS[0])
    base = await lora_engine.generate_full(greedy(PROMPTS[0]))
    adapted = await lora_engine.generate_full(greedy(PROMPTS[0], "lora-0"))
    assert base.token_ids != adapted.token_ids, "the adapter changed nothing"


async def test_base_and_adapter_requests_in_one_batch_equal_their_sequential_results(
    lora_engine,
):
    cases = [(p, a) for p in PROMPTS for a in (None, "lora-0", "lora-1", "lora-2", "lora-3")]
    sequential = [(await lora_engine.generate_full(greedy(p, a))).token_ids for p, a in cases]
    assert len({tuple(ids) for ids in sequential}) > len(PROMPTS), "adapters changed nothing"
    before = lora_engine.counters.max_batch_size
    lora_engine.counters.batch_sizes.clear()
    batched = await asyncio.gather(*(lora_engine.generate_full(greedy(p, a)) for p, a in cases))
    assert [o.token_ids for o in batched] == sequential
    # They did share the batch: the engine ran rows of several adapters in one step.
    assert lora_engine.counters.max_batch_size == 8, (before, lora_engine.counters.batch_sizes)


async def test_all_base_steps_skip_peft_and_equal_an_engine_without_adapters(
    lora_engine, smoke_engine
):
    """A step whose rows are all for the base model runs the model without PEFT's layers
    (no LoRA layer is called) and gives exactly what an engine without PEFT gives; a step
    with an adapter row goes through the LoRA layers again."""
    from peft.tuners.lora import LoraLayer

    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    layers = [m for m in lora_engine.model.modules() if isinstance(m, LoraLayer)]
    assert layers
    hooks = [m.register_forward_hook(count) for m in layers]
    try:
        plain = await asyncio.gather(*(smoke_engine.generate_full(greedy(p)) for p in PROMPTS))
        before = lora_engine.stats()["adapters"]
        base = await asyncio.gather(*(lora_engine.generate_full(greedy(p)) for p in PROMPTS))
        after = lora_engine.stats()["adapters"]
        assert [o.token_ids for o in base] == [o.token_ids for o in plain]
        assert calls == 0, f"{calls} LoRA layer calls in all-base steps"
        assert after["base_steps"] > before["base_steps"]
        assert after["adapter_steps"] == before["adapter_steps"]

        mixed = await asyncio.gather(
            *(lora_engine.generate_full(greedy(p, a)) for p in PROMPTS for a in (None, "lora-0"))
        )
        assert calls > 0, "a step with an adapter row did not use the LoRA layers"
        assert lora_engine.stats()["adapters"]["adapter_steps"] > after["adapter_steps"]
        assert [o.token_ids for o in mixed[::2]] == [o.token_ids for o in plain]
    finally:
        for hook in hooks:
            hook.remove()


def test_plain_view_shares_weights_and_holds_no_peft_layer(smoke_llm_dir, lora_dirs):
    """The view is the model's own weights (no copy) without any PEFT layer, and loading
    another adapter afterwards (new LoRA weights in the wrapped model) leaves it plain."""
    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    from serve_apps.engines.adapters import plain_view

    plain = AutoModelForCausalLM.from_pretrained(smoke_llm_dir).eval()
    wrapped = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smoke_llm_dir), str(lora_dirs["lora-0"])
    ).eval()
    view = plain_view(wrapped.get_base_model())
    wrapped.load_adapter(str(lora_dirs["lora-1"]), adapter_name="lora-1")
    assert not any(isinstance(m, BaseTunerLayer) for m in view.modules())
    assert any(isinstance(m, BaseTunerLayer) for m in wrapped.modules())
    ours = {id(p) for p in wrapped.parameters()}
    assert all(id(p) in ours for p in view.parameters())
    assert sum(p.numel() for p in view.parameters()) == sum(p.numel() for p in plain.parameters())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        assert torch.equal(view(input_ids=ids).logits, plain(input_ids=ids).logits)


async def test_unknown_adapter_is_model_not_found(lora_engine, smoke_engine):
    for engine in (lora_engine, smoke_engine):
        with pytest.raises(ModelNotFoundError) as info:
            await engine.generate_full(greedy("hi", "no-such-adapter"))
        assert info.value.status_code == 404 and info.value.param == "model"


async def test_more_adapters_than_the_bound_are_grouped_and_evicted(smoke_llm_dir, lora_dirs):
    """One adapter may be loaded at a time: requests for four adapters at once are served
    in groups (each one's output still its own), the least recently used one unloaded."""
    from serve_apps.engines.transformers_llm import TransformersEngine

    engine = TransformersEngine(
        str(smoke_llm_dir),
        max_batch_size=8,
        adapters=sources(lora_dirs, lora_dirs),
        max_loaded_adapters=1,
    )
    await engine.start()
    try:
        names = list(lora_dirs)
        sequential = [(await engine.generate_full(greedy(PROMPTS[1], n))).token_ids for n in names]
        batched = await asyncio.gather(
            *(engine.generate_full(greedy(PROMPTS[1], n)) for n in names * 2)
        )
        assert [o.token_ids for o in batched] == sequential * 2
        stats = engine.stats()["adapters"]
        assert len(stats["loaded"]) == 1
        assert stats["evictions"] >= len(names) - 1
        assert sum(stats["requests"].values()) == 3 * len(names)
    finally:
        await engine.shutdown()


# ------------------------------------------------------------------ configuration
def test_adapter_names_must_be_unique_and_smoke_adapters_need_the_smoke_model():
    with pytest.raises(ValueError, match="differ"):
        ModelConfig(served_model_name="m", adapters=[AdapterConfig(name="m")])
    with pytest.raises(ValueError, match="differ"):
        ModelConfig(served_model_name="m", adapters=[AdapterConfig(name="a")] * 2)
    with pytest.raises(ValueError, match="smoke adapters"):
        ModelConfig(served_model_name="m", model="org/real", adapters=[AdapterConfig(name="a")])
    with pytest.raises(ValueError, match="text models only"):
        ModelConfig(
            served_model_name="m", modality="image-text", adapters=[AdapterConfig(name="a")]
        )
    real = ModelConfig(
        served_model_name="m",
        model="org/real",
        adapters=[AdapterConfig(name="a", path="org/lora", revision="v1")],
    )
    assert real.served_names == ["m", "a"]
    smoke = real.as_smoke()
    assert smoke.adapters == [AdapterConfig(name="a", seed=0)]


def test_adapter_names_route_to_their_service_and_clash_with_no_other_name():
    from serve_apps.registry import AppArgs, AppContext

    args = AppArgs.model_validate(
        {"llm": {"served_model_name": "base", "adapters": [{"name": "tuned"}]}}
    )
    assert AppContext(args, {}).model_services == {
        "base": "llm",
        "tuned": "llm",
        "smoke-codegen": "codegen",
        "smoke-detector": "detector",
    }
    with pytest.raises(ValueError, match="adapter names"):
        AppArgs.model_validate(
            {"llm": {"served_model_name": "base", "adapters": [{"name": "smoke-codegen"}]}}
        )


def test_hub_adapters_are_provisioned_like_hub_models():
    from serve_apps.provision import HubModel, model_assets

    config = ModelConfig(
        served_model_name="m",
        model="org/base",
        revision="abc",
        adapters=[
            AdapterConfig(name="a", path="org/lora-a", revision="def"),
            AdapterConfig(name="b", path="/models/lora-b"),
        ],
    )
    assert model_assets(config) == [HubModel("org/base", "abc"), HubModel("org/lora-a", "def")]
