"""`python -m cluster check-capacity`: the production config on a cluster whose nodes
cannot host it fails at once, naming the resource no node has."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.capacity import unplaceable
from cluster.placement import node_resources
from cluster.pools import A100_40GB, A100_80GB, CPU
from cluster.serve_config import resolve_deployments

GIB = 2**30
# What `ray start` on a 16-core, 64 GiB machine without GPUs advertises.
PLAIN = {"CPU": 16.0, "memory": 40 * GIB, "object_store_memory": 20 * GIB, "node:10.0.0.1": 1.0}


def test_a_plain_cpu_cluster_names_the_accelerators_it_lacks(prod_config):
    deployments = resolve_deployments(prod_config).deployments
    problems = {f.reason.split(":")[0]: f.reason for f in unplaceable(deployments, [PLAIN])}
    assert set(problems) == {
        "Ingress",
        "LLM",
        "Codegen",
        "Detector",
        "SAM",
        "Grounder",
        "BatchRunner",
    }
    assert "no node has GPU" in problems["LLM"] and "accelerator_type:A100-80G" in problems["LLM"]
    assert "accelerator_type:A100-40G" in problems["SAM"]
    assert "pool:cpu" in problems["Ingress"] and "GPU" not in problems["Ingress"]
    assert "pool:cpu" in problems["BatchRunner"] and "GPU" not in problems["BatchRunner"]
    assert "advertise: CPU, memory, object_store_memory" in problems["LLM"]


def test_the_rendered_pools_nodes_host_every_deployment(prod_config):
    deployments = resolve_deployments(prod_config).deployments
    nodes = [node_resources(p, p.shape("gke")) for p in (A100_80GB, A100_40GB, CPU)]
    assert unplaceable(deployments, nodes) == []
    # Every resource present, but never on one node together: still an error.
    gpu_only = {"GPU": 8.0, "CPU": 0.5, "memory": 100 * GIB, "accelerator_type:A100-80G": 1.0}
    cpu_only = {"CPU": 64.0, "memory": 100 * GIB, "accelerator_type:A100-80G": 1.0}
    llm = [d for d in deployments if d.name == "LLM"]
    (finding,) = unplaceable(llm, [gpu_only, cpu_only])
    assert "no single node has all of" in finding.reason


@pytest.mark.ray
def test_the_cli_fails_fast_on_a_running_plain_ray_cluster(tmp_path):
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()  # another test's local cluster serves as well
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    address = ray.get_runtime_context().gcs_address
    try:
        out = subprocess.run(
            [sys.executable, "-m", "cluster", "check-capacity", "--address", address],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if started:
            ray.shutdown()
    assert out.returncode == 1, out.stdout + out.stderr
    llm = next(line for line in out.stderr.splitlines() if "LLM: no node has" in line)
    assert "GPU (a replica needs GPU: 1)" in llm and "accelerator_type:A100-80G" in llm
