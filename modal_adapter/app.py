"""The serving graph on Modal: one class per Serve deployment, the same HTTP API.

    SERVE_APPS_MODAL_CONFIG=cluster/serve-prod.yaml SERVE_APPS_MODAL_MODE=prod \\
        modal deploy modal_adapter/app.py          # a persistent, named app
    SERVE_APPS_MODAL_CONFIG=config.yaml SERVE_APPS_MODAL_MODE=dev \\
        modal serve modal_adapter/app.py           # an ephemeral one that reloads on edits

Both variables are optional (default: the production config in dev mode) and validated
(``modal_adapter.plan.ModalSettings``); the config is linted like ``python -m cluster lint``
before anything is built. ``SERVE_APPS_MODAL_HF_SECRET=hf-token`` gives the prefetch a
Modal secret with ``HF_TOKEN`` (gated or private models); without it nothing needs one.

Before the first request, once per volume (and after a model change):

    SERVE_APPS_MODAL_MODE=dev modal run modal_adapter/app.py::prefetch     # models -> Volume
    SERVE_APPS_MODAL_MODE=dev modal run modal_adapter/app.py::smoke_test   # every route once

(dev mode: the ephemeral app ``modal run`` makes keeps no container warm.) The model
classes load only what the prefetch put on the Volume (``serve_apps.provision``).

Nothing here knows about models or pipelines. The Serve config becomes a plan
(``modal_adapter.plan``): for every service of ``serve_apps.registry`` the config turns
on (or every group packed on one GPU), a Modal class with the deployment's GPU (from the
node-pool table), container bounds, concurrency and scale-down window; and an ``Ingress``
class that serves the same FastAPI app as the Ray Serve ingress, calling the other classes
through the handle seam. The plan is baked into the image, so every container rebuilds
exactly these classes.
"""

from __future__ import annotations

import os

import modal
from modal.file_pattern_matcher import FilePatternMatcher

from modal_adapter.plan import (
    PLAN_ENV,
    PREFETCH_TIMEOUT_S,
    REPO,
    AppPlan,
    ClassPlan,
    package_data,
    plan_from_settings,
)
from modal_adapter.runtime import IngressHost, ServerHost

# In a container: the plan the deploy baked in. At deploy: from the chosen Serve config.
PLAN = (
    AppPlan.model_validate_json(os.environ[PLAN_ENV])
    if os.environ.get(PLAN_ENV)
    else plan_from_settings()
)

# What the source mount leaves out: everything but Python files and package data.
SOURCE_IGNORE = ~FilePatternMatcher("**/*.py", *package_data())

image = (
    modal.Image.debian_slim(python_version=PLAN.image.python_version)
    .add_local_file(REPO / PLAN.image.constraints, "/root/constraints.txt", copy=True)
    .add_local_file(REPO / "requirements/spacy-model.txt", "/root/spacy-model.txt", copy=True)
    .pip_install(*PLAN.image.pip, extra_options="-c /root/constraints.txt")
)
if PLAN.image.commands:
    image = image.run_commands(*PLAN.image.commands)
image = (
    image.env({**PLAN.env, PLAN_ENV: PLAN.model_dump_json()})
    # Our own code last: mounted at container start, so editing it rebuilds no layer. The
    # .py files and the package data the code reads (e.g. the smoke tokenizer's corpus).
    .add_local_python_source("serve_apps", "modal_adapter", ignore=SOURCE_IGNORE)
)
app = modal.App(PLAN.app_name, image=image)
model_cache = modal.Volume.from_name(PLAN.volume_name, create_if_missing=True)
secrets = [modal.Secret.from_name(name) for name in PLAN.secrets]
# The API keys (auth.keys_env) reach the ingress only, never a model container.
ingress_secrets = [modal.Secret.from_name(name) for name in PLAN.ingress_secrets]


def _register(
    plan: ClassPlan, base: type, attrs: dict[str, object], *, models: bool, cache: bool = False
) -> tuple[object, type]:
    """Define the class ``plan.name`` at module level (Modal finds classes by name).

    ``models``: the class loads models (or calls the classes that do), so it mounts the
    model cache; otherwise it is the ingress, which gets the API keys' secret (when auth
    is on); ``cache``: the ingress mounts the model cache too (the batch store is there).
    """
    host = type(plan.name, (base,), {"__module__": __name__, "__qualname__": plan.name, **attrs})
    concurrent = modal.concurrent(max_inputs=plan.max_inputs, target_inputs=plan.target_inputs)
    modal_cls: object = app.cls(
        **plan.cls_options(),
        volumes={PLAN.volume_mount: model_cache} if models or cache else {},
        secrets=[] if models else ingress_secrets,
    )(concurrent(host))
    globals()[plan.name] = modal_cls
    return modal_cls, host


# One class per deployment the config turns on (LLM, Codegen, Grounder), or per packed
# group (DetectorSAM: both servers in one container, on one GPU); then the classes whose
# server calls the others (the batch runner), given their classes.
CLASSES = {
    plan.name: _register(
        plan, ServerHost, {"SERVERS": {s.name: s.config for s in plan.servers}}, models=True
    )
    for plan in PLAN.deployments
    if not plan.graph
}
# service key -> (Modal class, host class, deployment name): what the ingress calls.
SERVICES = {
    server.service: (*CLASSES[plan.name], server.name)
    for plan in PLAN.deployments
    if not plan.graph
    for server in plan.servers
}
GRAPH_CLASSES = {
    plan.name: _register(
        plan,
        ServerHost,
        {
            "SERVERS": {s.name: s.config for s in plan.servers},
            "ARGS": PLAN.args,
            "SERVICES": dict(SERVICES),
        },
        models=True,
    )
    for plan in PLAN.deployments
    if plan.graph
}
GRAPH_SERVICES = {
    server.service: (*GRAPH_CLASSES[plan.name], server.name)
    for plan in PLAN.deployments
    if plan.graph
    for server in plan.servers
}
# With the batch API on, the ingress reads the batch store, kept on the model-cache Volume.
Ingress, _ = _register(
    PLAN.ingress,
    IngressHost,
    {"ARGS": PLAN.args, "SERVICES": {**SERVICES, **GRAPH_SERVICES}},
    models=False,
    cache=bool(GRAPH_SERVICES),
)


@app.function(
    volumes={PLAN.volume_mount: model_cache},
    secrets=secrets,
    timeout=PREFETCH_TIMEOUT_S,
    cpu=4,
    memory=16 * 1024,
)
def prefetch() -> list[str]:
    """Every model the config names onto the Volume (``serve_apps.provision``): resumable,
    verified, with a manifest the model classes check at start."""
    from serve_apps.provision import assets
    from serve_apps.provision import prefetch as fetch
    from serve_apps.registry import AppArgs

    try:
        paths = fetch(assets(AppArgs.model_validate(PLAN.args)))
    finally:  # what was downloaded stays, even when a later file fails: the next run resumes
        model_cache.commit()
    for path in paths:
        print(f"ok  {path}")
    return [str(path) for path in paths]


@app.local_entrypoint()
def smoke_test(url: str = "", timeout: float = 600.0) -> None:
    """Every route of the deployed app once, a pass/fail table (``serve_apps.smoke_check``).

    ``--url``: the Ingress's URL; by default the one of the app ``modal deploy`` made.
    """
    import asyncio

    from serve_apps.smoke_check import check_url, table

    if not url:
        deployed = modal.Cls.from_name(PLAN.app_name, PLAN.ingress.name)
        url = deployed().web.get_web_url()
    rows = asyncio.run(check_url(url.rstrip("/"), timeout))
    print(table(rows))
    if not all(row.ok for row in rows):
        raise SystemExit(1)
