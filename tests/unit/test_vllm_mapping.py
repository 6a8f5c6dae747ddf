"""The vLLM engine's pure decisions, checked without vLLM (default lane).

How vLLM's request errors map onto ours, and how ``constraint_satisfied`` is decided by
replaying the generated tokens through our own llguidance matcher.
"""

from __future__ import annotations

import pytest

from serve_apps.engines.base import Constraint
from serve_apps.engines.vllm_llm import _client_error, _satisfied
from serve_apps.errors import ConstraintError, ContextLengthError, InvalidRequestError


class FakeVLLMValidationError(Exception):
    """Shaped like vllm.exceptions.VLLMValidationError (message + parameter)."""

    def __init__(self, message, parameter=None):
        super().__init__(message)
        self.parameter = parameter


REGEX = Constraint("regex", "[a-c]{4}")


@pytest.mark.parametrize(
    ("message", "parameter", "constraint", "cls", "param"),
    [
        ("Grammar error: unknown name", None, REGEX, ConstraintError, "regex"),
        ("bad", "structured_outputs.json", REGEX, ConstraintError, "regex"),
        (
            "This model's maximum context length is 2048 tokens",
            None,
            None,
            ContextLengthError,
            "max_tokens",
        ),
        ("top_p must be in (0, 1]", "top_p", None, InvalidRequestError, "top_p"),
    ],
)
def test_vllm_request_errors_keep_their_message_and_become_400s(
    message, parameter, constraint, cls, param
):
    err = _client_error(FakeVLLMValidationError(message, parameter), constraint)
    assert type(err) is cls and err.status_code == 400
    assert message in err.message and err.param == param


@pytest.fixture(scope="module")
def compiler(smoke_llm_dir):
    from transformers import AutoTokenizer

    from serve_apps.engines.constraints import ConstraintCompiler

    return ConstraintCompiler.for_hf_tokenizer(AutoTokenizer.from_pretrained(smoke_llm_dir))


@pytest.fixture(scope="module")
def ids(compiler, smoke_llm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smoke_llm_dir)

    def encode(text, eos=False):
        out = tok(text, add_special_tokens=False).input_ids
        return [*out, tok.eos_token_id] if eos else out

    return encode


def test_complete_output_ending_in_eos_is_satisfied(compiler, ids):
    assert _satisfied(compiler.matcher(REGEX), ids("abca", eos=True), False) == (True, True)


def test_complete_output_cut_before_its_eos_is_complete(compiler, ids):
    # vLLM stopped on max_tokens right after the grammar ended: the engine calls it "stop".
    assert _satisfied(compiler.matcher(REGEX), ids("abca"), False) == (True, True)


def test_partial_output_is_not_satisfied(compiler, ids):
    assert _satisfied(compiler.matcher(REGEX), ids("ab"), False) == (False, False)


def test_output_cut_by_a_stop_string_is_not_vouched_for(compiler, ids):
    grammar = Constraint("regex", "(ab)+")
    # "abab" is accepted, but the grammar could go on: a stop string ended it.
    assert _satisfied(compiler.matcher(grammar), ids("abab"), True) == (False, False)
    assert _satisfied(compiler.matcher(grammar), ids("abab"), False) == (True, False)


def test_a_token_the_grammar_rejects_is_never_vouched_for(compiler, ids):
    assert _satisfied(compiler.matcher(REGEX), ids("abz"), False) == (False, False)


# ------------------------------------------------------------------ LoRA adapters
def test_adapters_map_to_vllm_lora_engine_args_and_stable_request_ids(tmp_path):
    from serve_apps.config import AdapterConfig, ModelConfig
    from serve_apps.engines.adapters import AdapterSource
    from serve_apps.engines.vllm_llm import (
        VLLMEngine,
        local_adapter_path,
        lora_engine_args,
        lora_request_args,
    )

    local = tmp_path / "lora"
    local.mkdir()
    adapters = {
        "a": AdapterSource("a", str(local)),
        "b": AdapterSource("b", "org/lora-b", revision="v2"),
        "c": AdapterSource("c", "org/lora-c"),
    }
    assert lora_engine_args({}, 4, 16) == {}
    assert lora_engine_args(adapters, 2, 32) == {
        "enable_lora": True,
        "max_loras": 2,
        "max_cpu_loras": 3,
        "max_lora_rank": 32,
    }
    # Fewer adapters than slots: vLLM reserves no more GPU slots than adapters exist.
    assert lora_engine_args(adapters, 8, 16)["max_loras"] == 3
    assert lora_request_args(adapters) == {
        "a": {"lora_name": "a", "lora_int_id": 1, "lora_path": str(local)},
        "b": {"lora_name": "b", "lora_int_id": 2, "lora_path": "org/lora-b"},
        "c": {"lora_name": "c", "lora_int_id": 3, "lora_path": "org/lora-c"},
    }
    assert local_adapter_path(adapters["a"]) == str(local)

    config = ModelConfig(
        served_model_name="m",
        model="org/base",
        backend="vllm",
        adapters=[AdapterConfig(name="a", path=str(local))],
        max_loaded_adapters=3,
        max_lora_rank=64,
    )
    engine = VLLMEngine.from_config(config, "org/base", adapters={"a": adapters["a"]})
    assert engine.engine_args["enable_lora"] is True
    assert engine.engine_args["max_loras"] == 1 and engine.engine_args["max_lora_rank"] == 64
    plain = VLLMEngine.from_config(config.model_copy(update={"adapters": []}), "org/base")
    assert "enable_lora" not in plain.engine_args


async def test_vllm_engine_refuses_an_unknown_adapter_before_vllm_sees_it(tmp_path):
    from serve_apps.engines.adapters import AdapterSource
    from serve_apps.engines.base import GenerationRequest, SamplingParams
    from serve_apps.engines.vllm_llm import VLLMEngine
    from serve_apps.errors import ModelNotFoundError

    engine = VLLMEngine("org/base", adapters={"a": AdapterSource("a", str(tmp_path))})
    request = GenerationRequest("x", SamplingParams(max_tokens=1), adapter="nope")
    with pytest.raises(ModelNotFoundError):
        await engine._prepare(request)


def test_a_token_mask_maps_to_allowed_token_ids_with_eos_kept():
    from serve_apps.engines.base import SamplingParams
    from serve_apps.engines.vllm_llm import _allowed_token_ids

    def sp(**kw):
        return SamplingParams(max_tokens=4, **kw)

    assert _allowed_token_ids(sp(), 10, (9,)) is None
    assert _allowed_token_ids(sp(allowed_token_ids=frozenset({1, 2, 3})), 10, (9,)) == [1, 2, 3, 9]
    forbidden = sp(forbidden_token_ids=frozenset({0, 4, 9}))
    assert _allowed_token_ids(forbidden, 6, (9,)) == [1, 2, 3, 5, 9]


class FakeLogprob:
    """Shaped like vllm.logprobs.Logprob."""

    def __init__(self, logprob, rank, decoded_token):
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token


def test_vllm_logprobs_map_to_the_sampled_token_and_ranked_alternatives():
    from serve_apps.engines.vllm_llm import _logprobs

    entries = [
        # The sampled token (rank 3) comes first, then the top 2 by rank.
        {7: FakeLogprob(-2.5, 3, "c"), 1: FakeLogprob(-0.1, 1, "a"), 2: FakeLogprob(-1.0, 2, None)},
        {1: FakeLogprob(float("-inf"), 1, "a")},
    ]
    out = _logprobs([7, 1], entries, 2, lambda i: f"<{i}>")
    assert out[0].token == "c" and out[0].logprob == -2.5
    assert out[0].top == (("a", -0.1), ("<2>", -1.0))
    assert out[1].logprob == -9999.0  # JSON has no -inf
    assert _logprobs([1], entries[1:], 0, str)[0].top == ()


# ------------------------------------------------------------------ vision-language
def test_an_image_text_model_on_vllm_maps_to_the_vision_engine_with_its_options():
    """The detector on ``backend: vllm``: vLLM's vision engine, images only (no video),
    the pixel budget for vLLM's processor, tensor parallelism and placement as for text."""
    import sys

    from serve_apps.engines import create_llm_engine
    from serve_apps.engines.vllm_vl import VLLMVLEngine
    from serve_apps.registry import AppArgs

    args = AppArgs.model_validate(
        {
            "detector": {
                "served_model_name": "rex",
                "model": "IDEA-Research/Rex-Omni",
                "backend": "vllm",
                "max_batch_size": 16,
                "image_min_pixels": 3136,
                "image_max_pixels": 1003520,
                "vllm": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8},
            }
        }
    )
    cfg = args.detector
    assert cfg is not None
    engine = create_llm_engine(cfg, "IDEA-Research/Rex-Omni")
    assert type(engine) is VLLMVLEngine and engine.supports_images
    engine_args = engine.engine_args
    assert engine_args["tensor_parallel_size"] == 2 and engine_args["max_num_seqs"] == 16
    assert engine_args["limit_mm_per_prompt"] == {"video": 0}
    assert engine_args["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 1003520}
    assert engine_args["structured_outputs_config"]["backend"] == "guidance"
    placed = create_llm_engine(cfg, "IDEA-Research/Rex-Omni", placement_group=object())
    assert placed.engine_args["distributed_executor_backend"] == "ray"  # type: ignore[attr-defined]
    # No pixel budget configured: vLLM's processor keeps the model's own.
    plain = create_llm_engine(
        cfg.model_copy(update={"image_max_pixels": None, "image_min_pixels": None}), "m"
    )
    assert "mm_processor_kwargs" not in plain.engine_args  # type: ignore[attr-defined]
    assert "vllm" not in sys.modules


def test_a_vllm_detector_gets_worker_bundles_like_a_text_model():
    from serve_apps.config import DetectorConfig
    from serve_apps.worker_bundles import replica_placement

    cfg = DetectorConfig(backend="vllm", vllm={"tensor_parallel_size": 2})
    assert replica_placement(cfg)["placement_group_bundles"] == [
        {"GPU": 1.0, "CPU": 1.0},
        {"GPU": 1.0},
    ]


def test_a_request_with_images_becomes_a_token_prompt_with_multimodal_data():
    from PIL import Image

    from serve_apps.engines.vllm_vl import multimodal_prompt

    a, b = Image.new("RGB", (32, 32)), Image.new("RGB", (64, 48))
    prompt = multimodal_prompt((1, 2, 3), "text", [a, b])
    assert prompt == {
        "prompt_token_ids": [1, 2, 3],
        "prompt": "text",
        "multi_modal_data": {"image": [a, b]},
    }
    assert prompt["multi_modal_data"]["image"][0] is a  # the decoded images, in order


async def test_vllm_vision_engine_renders_like_transformers_and_checks_images_first(smoke_vl_dir):
    """The same chat template (the processor's) as the transformers engine, and a request
    whose placeholders do not match its images is refused before vLLM is touched."""
    import sys

    from PIL import Image

    from serve_apps.engines.base import GenerationRequest, SamplingParams
    from serve_apps.engines.transformers_vl import TransformersVLEngine
    from serve_apps.engines.vllm_vl import VLLMVLEngine
    from serve_apps.errors import InvalidRequestError

    ours = VLLMVLEngine(str(smoke_vl_dir))
    ours._load_processor(None, False)
    theirs = TransformersVLEngine(str(smoke_vl_dir))
    theirs._load_processor(None, False)
    messages = [
        {"role": "system", "content": "You are a detector."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect cat."}]},
    ]
    prompt = ours.apply_chat_template(messages)
    assert prompt == theirs.apply_chat_template(messages)
    assert prompt.count(ours.processor.image_token) == 1
    image = Image.new("RGB", (64, 64))
    for images in ([], [image, image]):
        request = GenerationRequest(prompt, SamplingParams(max_tokens=4), images=images)
        with pytest.raises(InvalidRequestError) as info:
            await ours._engine_input(request, [1, 2, 3])
        assert info.value.code == "image_count_mismatch"
    assert "vllm" not in sys.modules
