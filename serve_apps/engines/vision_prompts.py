"""What the vision-language engines share, on every backend (:mod:`.transformers_vl`,
:mod:`.vllm_vl`): the model's processor renders the chat template (an image part becomes
the model's image placeholder), holds the pixel budget and names the image token, and a
request's images are checked against its placeholders the same way. So a request with
images gets the same prompt, and the same refusals, on both backends.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InvalidRequestError
from .base import GenerationRequest

if TYPE_CHECKING:
    from ..config import ModelConfig


def set_pixel_bounds(image_processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Apply image resolution bounds to a Qwen-VL style image processor (its pixel budget)."""
    # transformers 5 keeps the budget in ``size`` (a SizeDict); the old ``min_pixels`` /
    # ``max_pixels`` attributes are deprecated.
    size = getattr(image_processor, "size", None)
    for value, key in ((min_pixels, "shortest_edge"), (max_pixels, "longest_edge")):
        if value is None:
            continue
        if size is None or key not in size:
            raise ValueError(f"{type(image_processor).__name__} has no pixel budget ({key}) to set")
        size[key] = value


def processor_error(e: Exception) -> InvalidRequestError:
    """A processor's refusal of a request's images (e.g. too small to patch): a 400."""
    return InvalidRequestError(
        f"the model's processor rejected the input: {e}", code="invalid_image"
    )


class VisionPrompts:
    """Mixin for a :class:`~.tokenized.TokenizedEngine` whose model takes images.

    It takes the pixel budget in the constructor (before the engine's own options) and
    the engine calls :meth:`_load_processor` when it loads; ``apply_chat_template`` then
    renders with the processor's template.
    """

    supports_images: ClassVar[bool] = True
    model_name_or_path: str
    processor: Any

    def __init__(
        self,
        model: str,
        *,
        image_min_pixels: int | None = None,
        image_max_pixels: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(model, **kwargs)  # type: ignore[call-arg]  # the engine, next in the MRO
        self._image_min_pixels = image_min_pixels
        self._image_max_pixels = image_max_pixels
        self._image_token: str | None = None
        # The processor has its own tokenizer object, so preparing a request (in a worker
        # thread) never contends with the engine's tokenizer.
        self._proc_lock = threading.Lock()

    @staticmethod
    def vision_options(config: ModelConfig) -> dict[str, Any]:
        """The constructor's pixel budget from a model config."""
        return {
            "image_min_pixels": config.image_min_pixels,
            "image_max_pixels": config.image_max_pixels,
        }

    @staticmethod
    def refuse_adapters(adapters: Mapping[str, Any] | None) -> None:
        # ModelConfig refuses adapters on image-text models already.
        if adapters:
            raise ValueError("adapters are not served on vision-language models")

    def _load_processor(self, revision: str | None, trust_remote_code: bool) -> Any:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(
            self.model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
        set_pixel_bounds(
            self.processor.image_processor, self._image_min_pixels, self._image_max_pixels
        )
        self._image_token = getattr(self.processor, "image_token", None)
        return self.processor

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        with self._proc_lock:
            return str(
                self.processor.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            )

    def _check_image_placeholders(self, request: GenerationRequest) -> None:
        """One image placeholder in the prompt per image, or a 400."""
        if self._image_token is None:
            return
        placeholders = request.prompt.count(self._image_token)
        if placeholders != len(request.images):
            raise InvalidRequestError(
                f"the prompt has {placeholders} image placeholder(s) but "
                f"{len(request.images)} image(s) were given",
                param="messages",
                code="image_count_mismatch",
            )
