"""Vision-language engine on transformers: the same continuous-batching scheduler, with images.

:class:`TransformersVLEngine` is :class:`~.transformers_llm.TransformersEngine` with its
model-family hooks filled in for image-text-to-text models loaded with ``AutoProcessor`` /
``AutoModelForImageTextToText.from_pretrained(path_or_id)`` (Qwen2-VL, Qwen2.5-VL and
therefore Rex-Omni, which is a fine-tuned Qwen2.5-VL):

- the chat template, the pixel budget and the placeholder check are
  :class:`~.vision_prompts.VisionPrompts` (shared with the vLLM engine, :mod:`.vllm_vl`);
- the processor turns the templated prompt and its images into token ids (each image
  placeholder expanded to the image's patch count), ``pixel_values`` and
  ``image_grid_thw``; this runs before the request is queued, in a worker thread, so the
  scheduler thread only runs the model;
- a prefill batch concatenates its rows' ``pixel_values`` and grids (the model scatters
  image features into the placeholders in row-major order, which is the row order);
- multimodal RoPE (models with ``get_rope_index``): positions are 3-D and image tokens
  take fewer positions than tokens. They are computed per request from its own ids and
  grid, and every later token's position is ``tokens so far + offset`` with the request's
  own offset. The model keeps a ``rope_deltas`` attribute for this, but it is one value
  shared by every caller, so it is never relied on: explicit ``position_ids`` are always
  passed, which also keeps the model from writing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

from ..errors import InvalidRequestError
from .base import GenerationRequest, common_options
from .transformers_llm import PromptInputs, TransformersEngine, _Sequence, _torch_dtype
from .vision_prompts import VisionPrompts, processor_error

if TYPE_CHECKING:
    import torch

    from ..config import ModelConfig
    from .adapters import AdapterSource


class TransformersVLEngine(VisionPrompts, TransformersEngine):
    """An image-text-to-text model behind the LLM engine contract; takes images.

    The processor's own tokenizer (VisionPrompts) prepares requests in worker threads, so
    that never contends with detokenizing on the scheduler thread."""

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
        return cls(model, **cls.vision_options(config), **common_options(config))

    def _load_model(self) -> Any:
        from transformers import AutoModelForImageTextToText

        self._load_processor(self.revision, self._trust_remote_code)
        model: Any = AutoModelForImageTextToText.from_pretrained(
            self.model_name_or_path,
            revision=self.revision,
            dtype=_torch_dtype(self._dtype),
            trust_remote_code=self._trust_remote_code,
        )
        inner = getattr(model, "model", None)
        self._rope_index = getattr(inner, "get_rope_index", None)
        image_token_id = getattr(model.config, "image_token_id", None)
        self._image_token_id = -1 if image_token_id is None else int(image_token_id)
        return model

    # ------------------------------------------------------- model-family hooks
    async def _prompt_inputs(self, request: GenerationRequest) -> PromptInputs:
        # Image preprocessing is real CPU work: keep it off the event loop.
        return await asyncio.to_thread(self._vl_inputs, request)

    def _vl_inputs(self, request: GenerationRequest) -> PromptInputs:
        import torch

        images = list(request.images)
        self._check_image_placeholders(request)
        with self._proc_lock:
            try:
                enc = self.processor(
                    text=[request.prompt],
                    images=images or None,
                    return_tensors="pt",
                    add_special_tokens=request.add_special_tokens,
                )
            except (ValueError, TypeError) as e:
                # The processor rejects images it cannot handle (e.g. too small to patch).
                raise processor_error(e) from e
        input_ids: torch.Tensor = enc["input_ids"]
        extras: dict[str, Any] = {}
        if images:
            extras["pixel_values"] = enc["pixel_values"]
            extras["image_grid_thw"] = enc["image_grid_thw"]
        offset = 0
        if self._rope_index is not None:
            mm_types = enc.get("mm_token_type_ids")
            if mm_types is None:
                # Without it the model silently falls back to text positions; build it.
                mm_types = input_ids.eq(self._image_token_id).to(torch.int32)
            try:
                with torch.inference_mode():
                    positions, deltas = self._rope_index(
                        input_ids,
                        mm_token_type_ids=mm_types,
                        image_grid_thw=extras.get("image_grid_thw"),
                    )
            except (StopIteration, TypeError, ValueError, IndexError) as e:
                # The image tokens in the prompt do not match the images (e.g. a prompt
                # that spells out image tokens itself): the request's fault, not the
                # model's. (A StopIteration must not escape: raised through a Future in
                # the worker thread, it would leave the request hanging.)
                raise InvalidRequestError(
                    f"the prompt's image tokens do not match its images: {type(e).__name__}: {e}",
                    code="invalid_image",
                ) from e
            extras["positions"] = positions[:, 0, :]  # (3, prompt length)
            offset = int(deltas.reshape(-1)[0])
        return PromptInputs(input_ids[0].tolist(), extras, position_offset=offset)

    def _prefill_kwargs(self, seqs: list[_Sequence], attn: torch.Tensor) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = {}
        if self._rope_index is not None:
            width = attn.shape[1]
            positions = torch.zeros((3, len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                row = s.inputs.extras["positions"]
                positions[:, i, width - row.shape[1] :] = row
            kwargs["position_ids"] = positions.to(self.device)
        else:
            kwargs.update(super()._prefill_kwargs(seqs, attn))
        with_images = [s.inputs.extras for s in seqs if "pixel_values" in s.inputs.extras]
        if with_images:
            kwargs["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images]).to(
                self.device
            )
            kwargs["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images]).to(
                self.device
            )
        return kwargs

    def _step_position_ids(self, batch: list[_Sequence]) -> torch.Tensor:
        positions = super()._step_position_ids(batch)  # (batch, 1): n_ctx + offset
        if self._rope_index is None:
            return positions
        # Text tokens after the image advance all three RoPE axes together.
        return positions.unsqueeze(0).expand(3, -1, -1)
