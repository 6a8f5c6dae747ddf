"""Vision-language models on vLLM (``backend: vllm``, ``modality: image-text``): the detector
(Qwen2.5-VL architecture, as Rex-Omni) and any image-text model, with vLLM's continuous
batching and tensor parallelism.

:class:`VLLMVLEngine` is :class:`~.vllm_llm.VLLMEngine` (same options, constraints,
cancellation, errors, placement) plus images:

- the prompt comes from the model's processor's chat template and is checked against its
  images by :class:`~.vision_prompts.VisionPrompts`, the code the transformers engine uses,
  so both backends see the same prompt and refuse the same requests;
- a request with images goes to vLLM as a token prompt (our ids, one placeholder token per
  image) with the images as multimodal data (:func:`multimodal_prompt`). vLLM's renderer
  (its multimodal processor, in the replica process, off the event loop) expands every
  placeholder to the image's patch count before the request is queued, so the context
  check and ``prompt_tokens`` count the image tokens exactly, as on transformers;
- the configured pixel budget goes to vLLM's processor as ``mm_processor_kwargs``
  (``min_pixels``/``max_pixels``) and video inputs are off (:func:`vl_engine_args`);
- detection needs nothing more: the detector's prompt, its Lark grammar of Rex-Omni's
  answer (through vLLM's structured outputs, the guidance backend) and the parser are
  the server's, the same on both backends.

Workers are spawned, not forked, as for every vLLM engine (``VLLMEngine.start``); the
replica process itself never initialises CUDA (the processor here only renders templates;
images are processed by vLLM on the CPU), so a forked child could not inherit CUDA state
even where vLLM chose fork.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

from .base import GenerationRequest
from .vision_prompts import VisionPrompts, processor_error
from .vllm_llm import VLLMEngine, _client_error

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .adapters import AdapterSource


def vl_engine_args(min_pixels: int | None, max_pixels: int | None) -> dict[str, Any]:
    """vLLM engine args of an image-text model: no video inputs (so vLLM's memory profile
    reserves nothing for them) and the configured pixel budget for vLLM's processor (its
    Qwen-VL processors take ``min_pixels`` / ``max_pixels``)."""
    args: dict[str, Any] = {"limit_mm_per_prompt": {"video": 0}}
    budget = {
        key: value
        for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
        if value is not None
    }
    if budget:
        args["mm_processor_kwargs"] = budget
    return args


def multimodal_prompt(prompt_ids: Sequence[int], prompt: str, images: Sequence[Any]) -> dict:
    """vLLM's prompt (``TokensPrompt``) for a request with images: the token ids, one
    placeholder per image, which vLLM's processor expands, and the images (PIL) in order."""
    return {
        "prompt_token_ids": list(prompt_ids),
        "prompt": prompt,
        "multi_modal_data": {"image": list(images)},
    }


class VLLMVLEngine(VisionPrompts, VLLMEngine):
    """An image-text-to-text model served by vLLM behind the engine contract; takes images."""

    def __init__(self, model: str, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.engine_args.update(vl_engine_args(self._image_min_pixels, self._image_max_pixels))

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        model: str,
        *,
        placement_group: Any = None,
        adapters: Mapping[str, AdapterSource] | None = None,
    ) -> Self:
        cls.refuse_adapters(adapters)
        return super().from_config(config, model, placement_group=placement_group)

    @classmethod
    def _family_options(cls, config: ModelConfig) -> dict[str, Any]:
        return cls.vision_options(config)

    async def start(self) -> None:
        await super().start()
        await asyncio.to_thread(self._load_processor, self.revision, self._trust_remote_code)

    async def _engine_input(
        self, request: GenerationRequest, prompt_ids: list[int]
    ) -> tuple[Any, int]:
        self._check_image_placeholders(request)
        if not request.images:
            return await super()._engine_input(request, prompt_ids)
        from vllm.exceptions import VLLMClientError
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        renderer = self._llm.renderer
        prompt = parse_model_prompt(
            self._llm.model_config, multimodal_prompt(prompt_ids, request.prompt, request.images)
        )
        try:
            (engine_input,) = await renderer.render_cmpl_async([prompt])
        except VLLMClientError as e:
            raise _client_error(e) from e
        except (ValueError, TypeError) as e:
            raise processor_error(e) from e
        return engine_input, len(engine_input["prompt_token_ids"])
