"""The RayService renderer: Serve config + pools -> RayService, with nothing that drifts."""

from __future__ import annotations

import json
import re
import shlex
import textwrap

import pytest
import yaml

from cluster.placement import plan
from cluster.pools import POOLS, by_name
from cluster.render import (
    BASE_IMAGE,
    RAY_VERSION,
    RenderError,
    load_config,
    render_rayservice,
)
from cluster.serve_config import resolve_deployments
from tests.conftest import REPO


@pytest.fixture(scope="module", params=["gke", "eks"])
def rendered(request, prod_config):
    return request.param, render_rayservice(prod_config, request.param).rayservice.dump()


def walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")
    yield path, node


def test_serve_config_v2_is_the_serve_config_itself(rendered, prod_config):
    _, rs = rendered
    assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == prod_config


def test_the_head_runs_no_replica(rendered):
    _, rs = rendered
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    pod = head["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_one_worker_group_per_pool_with_bounds_from_the_deployments(rendered, prod_config):
    cloud, rs = rendered
    groups, findings = plan(
        resolve_deployments(prod_config).deployments, cloud, unpinned_is_error=True
    )
    assert not findings
    workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [w["groupName"] for w in workers] == [g.pool.name for g in groups]
    # On EKS (8 GPUs a node) the vision models pack onto the LLMs' p4de nodes.
    assert [w["groupName"] for w in workers] == {
        "gke": ["a100-80gb", "a100-40gb", "cpu"],
        "eks": ["a100-80gb", "cpu"],
    }[cloud]
    for w, g in zip(workers, groups, strict=True):
        assert (w["minReplicas"], w["maxReplicas"]) == (g.min_nodes, g.max_nodes)
        assert w["replicas"] == w["minReplicas"]
    bounds = {w["groupName"]: (w["minReplicas"], w["maxReplicas"]) for w in workers}
    # LLM 1..3 and Codegen 0..2 at 1 GPU each; Detector 1..2 and SAM 1..2 at half a GPU
    # (two per 1-GPU node); Ingress 1..2, Grounder 1..2 and BatchRunner 1..1 at 1 CPU of a
    # 6-CPU pod.
    expected = {
        "gke": {"a100-80gb": (1, 5), "a100-40gb": (1, 2), "cpu": (1, 3)},
        # LLM 3 + Codegen 2 + Detector 2 + SAM 2 replicas, each packing only with itself:
        # up to 4 nodes; the minimum (1 + 0.5 + 0.5 GPUs) is one node, not one of each pool.
        "eks": {"a100-80gb": (1, 4)},
    }
    assert bounds.items() >= expected[cloud].items()


def test_bounds_follow_the_serve_config(prod_config):
    changed = yaml.safe_load(yaml.safe_dump(prod_config))
    llm = next(d for d in changed["applications"][0]["deployments"] if d["name"] == "LLM")
    llm["autoscaling_config"]["max_replicas"] = 6
    workers = render_rayservice(changed, "gke").rayservice.dump()["spec"]["rayClusterConfig"][
        "workerGroupSpecs"
    ]
    assert workers[0]["maxReplicas"] == 6 + 2


def test_workers_advertise_their_pool_to_ray(rendered):
    cloud, rs = rendered
    for w in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        pool = by_name(w["groupName"])
        shape = pool.shape(cloud)
        params = w["rayStartParams"]
        # KubeRay pastes `--resources=<value>` into the shell command; the shell must
        # hand `ray start` JSON naming the pool's resource.
        (arg,) = shlex.split(f"--resources={params['resources']}")
        hosted = {by_name(h).ray_resource: 1 for h in shape.hosts}
        assert json.loads(arg.removeprefix("--resources=")) == {pool.ray_resource: 1, **hosted}
        assert bool(hosted) == (cloud == "eks" and pool.name == "a100-80gb")
        assert params["num-gpus"] == str(shape.gpus)
        container = w["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert limits.get("nvidia.com/gpu", "0") == params["num-gpus"]
        assert limits["cpu"] == params["num-cpus"]
        assert w["template"]["spec"]["nodeSelector"] == dict(shape.node_selector)


def test_model_cache_on_every_worker_and_the_token_only_by_reference(rendered):
    _, rs = rendered
    for w in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        spec = w["template"]["spec"]
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["model-cache"]
        mounts = spec["containers"][0]["volumeMounts"]
        assert [m["name"] for m in mounts] == ["model-cache", "api-keys"]
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
        assert env["HF_HOME"]["value"].startswith(mounts[0]["mountPath"])
    for path, value in walk(rs):
        if path.endswith(".name") and isinstance(value, str) and "TOKEN" in value.upper():
            parent_env = [e for _, e in walk(rs) if isinstance(e, dict) and e.get("name") == value]
            assert all("value" not in e for e in parent_env), f"{path}: a literal token"


def test_serve_data_plane_on_the_head_and_every_worker(rendered):
    """Serve reads its data-plane variables when its processes start: the head (controller,
    HAProxy) and every worker (replicas) get the same ones, as scripts/serve sets them."""
    from serve_apps.dataplane import SERVE_ENV

    _, rs = rendered
    cluster = rs["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert len(pods) > 1
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV
    assert "serve_apps.dataplane" in (REPO / "scripts" / "serve").read_text()


def test_autoscaling_upgrade_strategy_and_versions(rendered):
    import ray

    _, rs = rendered
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v1"  # what the simulation runs
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert cluster["rayVersion"] == RAY_VERSION == ray.__version__
    pins = (REPO / "requirements/constraints.txt").read_text()
    assert f"ray=={RAY_VERSION}\n" in pins
    images = {v for p, v in walk(rs) if p.endswith(".image")}
    assert len(images) == 1 and f"ray{RAY_VERSION}" in images.pop()


def test_the_dockerfile_builds_on_the_same_ray_version():
    text = (REPO / "k8s/image/Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(RAY_VERSION)}$", text, re.M)
    base = re.search(r"^FROM (\S+)$", text, re.M).group(1)
    assert base.replace("${RAY_VERSION}", RAY_VERSION) == BASE_IMAGE


def test_the_local_config_is_not_a_cluster_config():
    with pytest.raises(RenderError) as e:
        render_rayservice(load_config(REPO / "config.yaml"), "gke")
    paths = {f.path for f in e.value.findings}
    assert "http_options.host" in paths
    assert any("ray_actor_options" in p for p in paths)  # unpinned CPU replicas


def test_renders_deployments_it_has_never_heard_of():
    config = yaml.safe_load(
        textwrap.dedent(
            """\
            proxy_location: EveryNode
            http_options: {host: 0.0.0.0, port: 8000}
            applications:
              - name: vision
                import_path: tests.cluster.sample_app:build
                args: {services: [Detector, SAM, Grounder], front: Gate}
                deployments:
                  - name: Gate
                    ray_actor_options: {num_cpus: 1, resources: {"pool:cpu": 0.001}}
                  - name: Detector
                    autoscaling_config: {min_replicas: 1, max_replicas: 2}
                    ray_actor_options: {num_gpus: 1, accelerator_type: A100-80G}
                  - name: SAM
                    autoscaling_config: {min_replicas: 0, max_replicas: 3}
                    ray_actor_options: {num_gpus: 0.5, accelerator_type: A100-40G}
                  - name: Grounder
                    ray_actor_options: {num_cpus: 2, resources: {"pool:cpu": 0.001}}
            """
        )
    )
    workers = render_rayservice(config, "gke").rayservice.dump()["spec"]["rayClusterConfig"][
        "workerGroupSpecs"
    ]
    got = {w["groupName"]: (w["minReplicas"], w["maxReplicas"]) for w in workers}
    assert got == {"a100-80gb": (1, 2), "a100-40gb": (0, 2), "cpu": (1, 2)}
    assert {p.name for p in POOLS} == set(got)
