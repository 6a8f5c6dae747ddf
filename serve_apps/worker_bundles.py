"""What a model replica must reserve for its engine's workers, independent of the target.

A vLLM engine on GPUs runs one worker per GPU (``tensor_parallel_size`` of them). Those
workers are not the replica process itself, so asking for ``num_gpus`` on the replica is
not enough (and ``ray_actor_options`` from the Serve config's ``deployments:`` would
replace whatever the code set). As Ray Serve LLM does (``ray.llm._internal.serve``:
``placement_bundles`` and ``_merge_replica_actor_and_child_actor_bundles``), the replica
gets a placement group with one bundle per worker, and the replica itself is scheduled
in the first bundle, so that bundle also carries the replica's own CPU. The engine is
handed the group and puts its workers on the bundles.

The Ray adapter (``ray_app.build_app``) turns :func:`replica_placement` into deployment
options; no Ray import here.
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig

# CPUs the replica process itself reserves in the first bundle. Its `ray_actor_options`
# (from the Serve config) must fit in it: Ray Serve checks that at deploy time.
REPLICA_CPUS = 1.0


def worker_bundles(config: ModelConfig) -> list[dict[str, float]]:
    """One resource bundle per engine worker; empty when the replica's own resources do.

    With one worker (``tensor_parallel_size: 1``) vLLM's multiprocessing executor starts it
    as a child of the replica process, and the child inherits the GPU Ray gave the replica
    (``CUDA_VISIBLE_DEVICES``): the deployment's ``ray_actor_options`` (``num_gpus: 1``,
    ``accelerator_type``) are then the whole reservation, as for the transformers engine.
    A placement group would be wrong there: the replica would hold the bundle's GPU that
    its own worker needs.
    """
    if config.backend != "vllm":
        return []  # the transformers engine runs inside the replica process
    workers = config.vllm_options.tensor_parallel_size
    if workers == 1:
        return []
    if config.device == "cpu":
        # vLLM's CPU build: workers are local processes, one per CPU group.
        return [{"CPU": 1.0} for _ in range(workers)]
    return [{"GPU": 1.0} for _ in range(workers)]


def replica_placement(config: ModelConfig) -> dict[str, Any]:
    """Ray Serve deployment options (``placement_group_bundles``/``_strategy``) or ``{}``."""
    bundles = worker_bundles(config)
    if not bundles:
        return {}
    bundles[0]["CPU"] = bundles[0].get("CPU", 0.0) + REPLICA_CPUS
    return {
        "placement_group_bundles": bundles,
        "placement_group_strategy": config.vllm_options.placement_strategy,
    }
