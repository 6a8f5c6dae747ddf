import json
import subprocess
import sys

HEAVY = [
    "torch",
    "ray",
    "transformers",
    "modal",
    "llguidance",
    "vllm",
    "spacy",
    "segment_anything",
    "cv2",
    "PIL",
]


def test_importing_the_package_and_its_light_modules_loads_no_heavy_dependency():
    code = (
        "import json, sys\n"
        "import serve_apps, serve_apps.config, serve_apps.errors, serve_apps.handles\n"
        "import serve_apps.ingress, serve_apps.schemas.openai, serve_apps.schemas.generate\n"
        "import serve_apps.engines, serve_apps.engines.base, serve_apps.replicas.llm\n"
        "import serve_apps.registry, serve_apps.replicas, serve_apps.clients\n"
        "import serve_apps.routers.openai, serve_apps.routers.generate, serve_apps.routers.health\n"
        # Selecting the vLLM backend by name imports vLLM only when the engine starts.
        "import serve_apps.worker_bundles, serve_apps.engines.vllm_llm\n"
        "import serve_apps.images, serve_apps.schemas.vision, serve_apps.routers.vision\n"
        "import serve_apps.pipelines.vision, serve_apps.replicas.vision\n"
        "import serve_apps.engines.detection, serve_apps.engines.batching\n"
        "import serve_apps.batch.store, serve_apps.batch.runner, serve_apps.batch.webhooks\n"
        "import serve_apps.routers.batch, serve_apps.cli\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
