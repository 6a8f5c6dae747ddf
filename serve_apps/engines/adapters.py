"""LoRA adapters on the transformers backend, with PEFT.

A model config's ``adapters`` are served as model names of their own. On this backend the
base model is wrapped once in a ``peft.PeftModel``; adapters are loaded into it on first
use (``load_adapter``) and dropped least recently used first (``delete_adapter``) so that
at most ``max_loaded`` are held (one more for the moment of a swap: the new one is loaded
before the old one goes).

Requests for different adapters, and for the base model, share one running batch: every
forward pass gets ``adapter_names`` (one per row, ``"__base__"`` for the base model), which
PEFT's LoRA layers apply row by row (its "mixed adapter batches"). A forward pass whose rows
are all for the base model skips PEFT altogether: it runs :attr:`PeftAdapters.plain`, a view
of the model with the original layers where PEFT put its LoRA layers (same weight tensors,
no copy), so base requests on an engine with adapters cost what they cost without PEFT
(PEFT's per-layer hooks roughly doubled the smoke model's decode step). When a request needs an
adapter that is not loaded and every loaded one is in use by a running row while the bound
is reached, the request waits (outside the batch) until one is free: requests are grouped
rather than the bound broken.

Everything here runs on the engine's scheduler thread (loading changes the model's
modules, which must not happen during a forward pass). Loading is logged and counted in
``stats()["adapters"]`` (loads, seconds spent loading, requests per adapter), so a first
use is visible, not a silent stall.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ModelNotFoundError

logger = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for rows that run without an adapter


@dataclass(frozen=True)
class AdapterSource:
    """Where one adapter's weights are: a local directory or a Hub id (at ``revision``)."""

    name: str
    path: str
    revision: str | None = None


def unknown_adapter(name: str, known: Iterable[str]) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r} is not an adapter of this model; its adapters: {sorted(known)}",
        param="model",
    )


class PeftAdapters:
    """The adapters of one engine: which are loaded (LRU), and loading/evicting them."""

    def __init__(self, sources: Mapping[str, AdapterSource], max_loaded: int):
        if not sources:
            raise ValueError("PeftAdapters needs at least one adapter")
        self.sources = dict(sources)
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.loads: Counter[str] = Counter()
        self.evictions = 0
        self.load_seconds = 0.0
        self.requests: Counter[str] = Counter()
        self.model: Any = None  # the PeftModel
        self.plain: Any = None  # the model without PEFT's layers (see plain_view)
        self.base_steps = 0  # forward passes whose rows were all for the base model
        self.adapter_steps = 0  # forward passes with at least one adapter row

    def check(self, name: str | None) -> None:
        """``ModelNotFoundError`` (404) for a name that is no adapter of this model."""
        if name is not None and name not in self.sources:
            raise unknown_adapter(name, self.sources)

    # ------------------------------------------------------------- loading
    def wrap(self, base_model: Any) -> Any:
        """The base model wrapped in a ``PeftModel`` with the first adapter loaded."""
        from peft import PeftModel

        first = next(iter(self.sources.values()))
        t0 = time.perf_counter()
        self.model = PeftModel.from_pretrained(
            base_model,
            first.path,
            adapter_name=first.name,
            revision=first.revision,
            is_trainable=False,
        )
        self._loaded_one(first.name, time.perf_counter() - t0)
        self.plain = plain_view(self.model.get_base_model()).eval()
        return self.model

    def _loaded_one(self, name: str, seconds: float) -> None:
        self._loaded[name] = None
        self.loads[name] += 1
        self.load_seconds += seconds
        logger.info(
            "loaded LoRA adapter %s in %.3f s (%d of at most %d held)",
            name,
            seconds,
            len(self._loaded),
            self.max_loaded,
        )

    def loaded(self) -> list[str]:
        """The loaded adapters, least recently used first."""
        return list(self._loaded)

    def acquire(self, name: str, in_use: set[str]) -> bool:
        """Make ``name`` loaded (most recently used); False when that would break the bound
        because every loaded adapter is in ``in_use`` (then nothing changed)."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return True
        if len(self._loaded) >= self.max_loaded and all(n in in_use for n in self._loaded):
            return False
        source = self.sources[name]
        logger.info(
            "loading LoRA adapter %s from %s (first use on this replica)", name, source.path
        )
        t0 = time.perf_counter()
        self.model.load_adapter(
            source.path, adapter_name=name, revision=source.revision, is_trainable=False
        )
        self._loaded_one(name, time.perf_counter() - t0)
        while len(self._loaded) > self.max_loaded:
            victim = next(n for n in self._loaded if n not in in_use and n != name)
            del self._loaded[victim]
            with warnings.catch_warnings():
                # PEFT warns when the adapter it calls active goes; rows name theirs.
                warnings.simplefilter("ignore", UserWarning)
                self.model.delete_adapter(victim)
            self.evictions += 1
            logger.info("unloaded LoRA adapter %s (least recently used)", victim)
        return True

    # ------------------------------------------------------------- batches
    @staticmethod
    def row_names(adapters: Iterable[str | None]) -> list[str]:
        """``adapter_names`` for a forward pass: one per row, the base model's for None."""
        return [BASE if a is None else a for a in adapters]

    def forward_for(self, adapters: Iterable[str | None]) -> tuple[Any, dict[str, Any]]:
        """The model to call for a batch whose rows use ``adapters`` (None: the base model),
        and the extra arguments of that call: the plain model when no row has an adapter,
        else the PEFT model with ``adapter_names``."""
        names = self.row_names(adapters)
        if all(n == BASE for n in names):
            self.base_steps += 1
            return self.plain, {}
        self.adapter_steps += 1
        return self.model, {"adapter_names": names}

    def stats(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded(),
            "max_loaded": self.max_loaded,
            "loads": dict(self.loads),
            "evictions": self.evictions,
            "load_seconds": round(self.load_seconds, 6),
            "requests": dict(self.requests),
            "base_steps": self.base_steps,
            "adapter_steps": self.adapter_steps,
        }


def plain_view(model: Any) -> Any:
    """``model`` (with PEFT's layers injected) as it was before PEFT: the same modules and
    weight tensors, except that every PEFT layer is replaced by the layer it wraps. Only
    the modules on a path to a PEFT layer are copied (shallow: a new child table, every
    parameter, buffer and setting shared); everything else is the model's own module.

    The view stays right when adapters are loaded or deleted later: PEFT then changes the
    child tables of the wrapped model (a new LoRA layer around a module, or new weights
    inside an existing LoRA layer), never the original layers the view holds, and it keeps
    those as the new layers' ``base_layer``. (Merging adapters into the weights would
    change them; this module never merges.)
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    memo: dict[int, Any] = {}

    def view(module: Any) -> Any:
        if id(module) in memo:
            return memo[id(module)]
        if isinstance(module, BaseTunerLayer):
            out = view(module.get_base_layer())
        elif isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save and the like
            out = view(module.original_module)
        else:
            children = {
                name: None if child is None else view(child)
                for name, child in module._modules.items()
            }
            if all(children[name] is child for name, child in module._modules.items()):
                out = module
            else:
                out = copy.copy(module)
                out._modules = children
        memo[id(module)] = out
        return out

    return view(model)
