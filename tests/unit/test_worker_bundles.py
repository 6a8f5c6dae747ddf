"""What a replica reserves for its engine's workers (serve_apps.worker_bundles, ray_app)."""

import pytest

from serve_apps.config import ModelConfig
from serve_apps.worker_bundles import replica_placement


def config(**kw):
    return ModelConfig.model_validate({"served_model_name": "m", **kw})


def test_transformers_replicas_need_no_placement_group():
    assert replica_placement(config()) == {}
    assert replica_placement(config(device="cuda")) == {}


def test_vllm_with_one_gpu_worker_uses_the_replicas_own_gpu():
    # The worker is a child process of the replica and inherits its GPU; a bundle would
    # make the replica hold the GPU its worker needs.
    assert replica_placement(config(backend="vllm")) == {}
    assert replica_placement(config(backend="vllm", vllm={"tensor_parallel_size": 1})) == {}


@pytest.mark.parametrize("tp", [2, 4])
def test_vllm_on_gpus_gets_one_gpu_bundle_per_worker_and_the_replica_in_the_first(tp):
    placement = replica_placement(config(backend="vllm", vllm={"tensor_parallel_size": tp}))
    bundles = placement["placement_group_bundles"]
    assert bundles[0] == {"GPU": 1.0, "CPU": 1.0}
    assert bundles[1:] == [{"GPU": 1.0}] * (tp - 1)
    assert placement["placement_group_strategy"] == "PACK"


def test_vllm_on_cpu_reserves_cpus_only_for_several_workers():
    assert replica_placement(config(backend="vllm", device="cpu")) == {}
    placement = replica_placement(
        config(
            backend="vllm",
            device="cpu",
            vllm={"tensor_parallel_size": 2, "placement_strategy": "STRICT_PACK"},
        )
    )
    assert placement == {
        "placement_group_bundles": [{"CPU": 2.0}, {"CPU": 1.0}],
        "placement_group_strategy": "STRICT_PACK",
    }


def test_build_app_gives_the_vllm_deployment_its_bundles():
    from serve_apps.ray_app import build_app

    app = build_app(
        {
            "llm": {
                "served_model_name": "big",
                "backend": "vllm",
                "vllm": {"tensor_parallel_size": 2},
            }
        }
    )
    # The ingress is bound with {service: bound deployment}; read their replica configs.
    services = app._bound_deployment.init_args[1]
    llm = services["llm"]._bound_deployment._replica_config
    codegen = services["codegen"]._bound_deployment._replica_config
    assert llm.placement_group_bundles == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}]
    assert llm.placement_group_strategy == "PACK"
    assert codegen.placement_group_bundles is None
