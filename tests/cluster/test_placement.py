"""Worker-group bounds: derived from the deployments' replica bounds and sizes."""

from __future__ import annotations

from cluster.placement import group_bounds, node_resources, plan, replicas_per_node
from cluster.pools import A100_40GB, A100_80GB, CPU_POOL
from cluster.serve_config import Deployment, replica_resources


def dep(name, lo, hi, options, per_node=None) -> Deployment:
    return Deployment(
        app="app",
        name=name,
        ray_actor_options=options,
        resources=replica_resources(options, None, per_node),
        min_replicas=lo,
        max_replicas=hi,
        autoscaling=None,
        max_replicas_per_node=per_node,
        path=f"applications[0].deployments[name={name}]",
        from_config=True,
    )


GPU1 = {"num_cpus": 4, "num_gpus": 1, "accelerator_type": "A100-80G"}


def test_replicas_per_node_is_bounded_by_every_resource():
    node = node_resources(A100_80GB, A100_80GB.shape("eks"))  # 8 GPUs, 90 CPUs
    assert replicas_per_node(replica_resources(GPU1), node) == 8
    heavy_cpu = {**GPU1, "num_cpus": 30}
    assert replicas_per_node(replica_resources(heavy_cpu), node) == 3
    half = {**GPU1, "num_gpus": 0.5, "num_cpus": 1}
    gke = node_resources(A100_80GB, A100_80GB.shape("gke"))
    assert replicas_per_node(replica_resources(half), gke) == 2
    assert replicas_per_node(replica_resources(GPU1), node, max_per_node=2) == 2
    assert replicas_per_node({"GPU": 1.0, "accelerator_type:H100": 0.001}, node) == 0


def test_bounds_sum_the_maxima_and_pack_the_minima():
    llm, code = dep("LLM", 1, 3, GPU1), dep("Codegen", 0, 2, GPU1)
    gke, _ = group_bounds(A100_80GB, "gke", [llm, code])
    eks, _ = group_bounds(A100_80GB, "eks", [llm, code])
    assert (gke.min_nodes, gke.max_nodes) == (1, 5)  # 1 GPU per node: one replica each
    assert (eks.min_nodes, eks.max_nodes) == (1, 2)  # 8 per node: ceil(3/8) + ceil(2/8)
    assert gke.per_node == {"app/LLM": 1, "app/Codegen": 1}


def test_min_nodes_count_by_volume_across_deployments():
    half = {"num_cpus": 1, "num_gpus": 0.5, "accelerator_type": "A100-40G"}
    a, b = dep("A", 3, 4, half), dep("B", 1, 1, half)
    bounds, findings = group_bounds(A100_40GB, "gke", [a, b])
    assert not findings
    assert bounds.min_nodes == 2  # 4 half-GPU replicas on 1-GPU nodes
    assert bounds.max_nodes == 2 + 1  # ceil(4/2) + ceil(1/2)


def test_a_replica_bigger_than_the_node_is_an_error():
    big = dep("Big", 1, 1, {**GPU1, "num_gpus": 2})
    bounds, findings = group_bounds(A100_80GB, "gke", [big])
    assert bounds is None
    assert "GPU=2" in findings[0].reason and "has GPU=1" in findings[0].reason
    ok, more = group_bounds(A100_80GB, "eks", [big])
    assert ok is not None and not more


def test_bounds_over_the_pools_max_nodes_are_an_error():
    many = dep("Many", 1, 20, GPU1)
    bounds, findings = group_bounds(A100_80GB, "gke", [many])
    assert bounds.max_nodes == 20
    assert findings and "allows 8" in findings[0].reason


def test_plan_assigns_each_deployment_to_its_pool():
    front = dep("Front", 1, 2, {"num_cpus": 1, "resources": {"pool:cpu": 0.001}})
    sam = dep("SAM", 0, 2, {"num_gpus": 1, "accelerator_type": "A100-40G"})
    llm = dep("LLM", 1, 1, GPU1)
    groups, findings = plan([front, sam, llm], "gke", unpinned_is_error=True)
    assert not findings
    assert [g.pool.name for g in groups] == ["a100-80gb", "a100-40gb", "cpu"]
    assert {g.pool.name: (g.min_nodes, g.max_nodes) for g in groups} == {
        "a100-80gb": (1, 1),
        "a100-40gb": (0, 2),
        "cpu": (1, 1),
    }
    assert groups[2].pool is CPU_POOL


def test_an_unpinned_cpu_replica_is_a_warning_or_an_error():
    loose = dep("Loose", 1, 1, {"num_cpus": 1})
    _, warn = plan([loose], "gke", unpinned_is_error=False)
    _, err = plan([loose], "gke", unpinned_is_error=True)
    assert [f.severity for f in warn] == ["warning"] and [f.severity for f in err] == ["error"]
