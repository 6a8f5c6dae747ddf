"""The node-pool table: one source for KubeRay, the fake cluster and Modal."""

from __future__ import annotations

import pytest

from cluster import pools
from cluster.pools import (
    A100_40GB,
    A100_80GB,
    CLOUDS,
    CPU_POOL,
    POOLS,
    NoPoolError,
    UnpinnedError,
    modal_gpu,
    pool_for,
    pool_for_options,
)


def test_every_pool_has_a_node_shape_on_every_cloud():
    for pool in POOLS:
        for cloud in CLOUDS:
            shape = pool.shape(cloud)
            assert shape.cloud == cloud
            assert 0 < shape.pod_cpus < shape.vcpus
            assert 0 < shape.pod_memory_gib < shape.memory_gib
            assert shape.node_selector, f"{pool.name} on {cloud} selects no node"
            assert (shape.gpus > 0) == pool.is_gpu
            tolerated = {t.key for t in shape.tolerations}
            assert ("nvidia.com/gpu" in tolerated) == pool.is_gpu


def test_gke_gpu_pools_select_the_gke_accelerator_label():
    assert A100_80GB.shape("gke").node_selector["cloud.google.com/gke-accelerator"] == (
        "nvidia-a100-80gb"
    )
    assert A100_40GB.shape("gke").node_selector["cloud.google.com/gke-accelerator"] == (
        "nvidia-tesla-a100"
    )


def test_eks_has_no_one_gpu_a100_node_so_its_shapes_have_eight():
    assert A100_80GB.shape("eks").gpus == 8 and A100_80GB.shape("gke").gpus == 1
    assert A100_40GB.shape("eks").instance_type == "p4d.24xlarge"


def test_ray_accelerator_types_are_rays_own_constants():
    from ray.util.accelerators import accelerators

    assert A100_80GB.ray_accelerator_type == accelerators.NVIDIA_A100_80G
    assert A100_40GB.ray_accelerator_type == accelerators.NVIDIA_A100_40G
    assert A100_80GB.ray_detected_accelerator_type == accelerators.NVIDIA_A100
    assert A100_80GB.ray_resource == "accelerator_type:A100-80G"


def test_the_pin_resource_is_what_ray_asks_for_accelerator_type():
    from ray._common.utils import resources_from_ray_options

    asked = resources_from_ray_options({"num_gpus": 1, "accelerator_type": "A100-40G"})
    assert asked[A100_40GB.ray_resource] == pools.PIN_AMOUNT


def test_pool_for_maps_ray_types_and_none_to_cpu():
    assert pool_for("A100-80G") is A100_80GB
    assert pool_for("A100-40G") is A100_40GB
    assert pool_for(None) is CPU_POOL


@pytest.mark.parametrize(
    ("asked", "suggestion"),
    [("A100-80GB", "A100-80G"), ("a100-40gb", "A100-40G"), ("A100", "A100-80G"), ("A100-80", None)],
)
def test_pool_for_rejects_other_names_with_a_suggestion(asked, suggestion):
    with pytest.raises(NoPoolError) as e:
        pool_for(asked)
    if suggestion is None:
        assert e.value.suggestion in ("A100-80G", "A100-40G")
    else:
        assert e.value.suggestion == suggestion


def test_pool_for_rejects_an_accelerator_no_pool_has():
    with pytest.raises(NoPoolError, match="no pool provides accelerator_type 'H100'"):
        pool_for("H100")


def test_pool_for_options_pins_gpu_and_cpu_replicas():
    assert pool_for_options({"num_gpus": 1, "accelerator_type": "A100-80G"}) is A100_80GB
    assert pool_for_options({"num_cpus": 1, "resources": {"pool:cpu": 0.001}}) is CPU_POOL
    with pytest.raises(NoPoolError, match="without accelerator_type"):
        pool_for_options({"num_gpus": 1})
    with pytest.raises(UnpinnedError):
        pool_for_options({"num_cpus": 1})
    with pytest.raises(NoPoolError, match="two pools"):
        pool_for_options({"accelerator_type": "A100-80G", "resources": {"pool:cpu": 0.001}})


def test_modal_gpu_strings_with_fallbacks():
    assert modal_gpu({"num_gpus": 1, "accelerator_type": "A100-80G"}) == ["A100-80GB", "H100"]
    assert modal_gpu({"num_gpus": 2, "accelerator_type": "A100-40G"}) == [
        "A100-40GB:2",
        "A100-80GB:2",
    ]
    assert modal_gpu({"num_gpus": 0.5, "accelerator_type": "A100-40G"})[0] == "A100-40GB"
    assert modal_gpu({"num_cpus": 1}) is None
    assert CPU_POOL.modal_gpu_spec() is None


def test_the_pool_table_imports_no_framework():
    import json
    import subprocess
    import sys

    code = (
        "import json, sys, cluster, cluster.pools\n"
        "print(json.dumps([m for m in ('ray', 'pydantic', 'yaml', 'torch') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
