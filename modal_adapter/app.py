"""The serving graph on Modal: one class per Serve deployment, the same HTTP API.

    SERVE_APPS_MODAL_CONFIG=cluster/serve-prod.yaml SERVE_APPS_MODAL_MODE=prod \\
        modal deploy modal_adapter/app.py          # a persistent, named app
    SERVE_APPS_MODAL_CONFIG=config.yaml SERVE_APPS_MODAL_MODE=dev \\
        modal serve modal_adapter/app.py           # an ephemeral one that reloads on edits

Both variables are optional (default: the production config in dev mode) and validated
(``modal_adapter.plan.ModalSettings``); the config is linted like ``python -m cluster lint``
before anything is built.

Nothing here knows about models or pipelines. The Serve config becomes a plan
(``modal_adapter.plan``): for every service of ``serve_apps.registry`` the config turns
on, a Modal class with the deployment's GPU (from the node-pool table), container bounds,
concurrency and scale-down window; and an ``Ingress`` class that serves the same FastAPI
app as the Ray Serve ingress, calling the other classes through the handle seam. The plan
is baked into the image, so every container rebuilds exactly these classes.
"""

from __future__ import annotations

import os

import modal

from modal_adapter.plan import PLAN_ENV, REPO, AppPlan, ClassPlan, plan_from_settings
from modal_adapter.runtime import IngressHost, ServerHost

# In a container: the plan the deploy baked in. At deploy: from the chosen Serve config.
PLAN = (
    AppPlan.model_validate_json(os.environ[PLAN_ENV])
    if os.environ.get(PLAN_ENV)
    else plan_from_settings()
)

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
    # Our own code last: mounted at container start, so editing it rebuilds no layer.
    .add_local_python_source("serve_apps", "modal_adapter")
)
app = modal.App(PLAN.app_name, image=image)
model_cache = modal.Volume.from_name(PLAN.volume_name, create_if_missing=True)
secrets = [modal.Secret.from_name(name) for name in PLAN.secrets]


def _register(
    plan: ClassPlan, base: type, attrs: dict[str, object], *, models: bool, cache: bool = False
) -> tuple[object, type]:
    """Define the class ``plan.name`` at module level (Modal finds classes by name).

    ``models``: the class loads models, so it mounts the model cache and gets the secrets;
    ``cache``: it mounts the model cache only (the ingress, for the batch store).
    """
    host = type(plan.name, (base,), {"__module__": __name__, "__qualname__": plan.name, **attrs})
    concurrent = modal.concurrent(max_inputs=plan.max_inputs, target_inputs=plan.target_inputs)
    modal_cls: object = app.cls(
        **plan.cls_options(),
        volumes={PLAN.volume_mount: model_cache} if models or cache else {},
        secrets=secrets if models else [],
    )(concurrent(host))
    globals()[plan.name] = modal_cls
    return modal_cls, host


# One class per deployment the config turns on: LLM, Codegen, Detector, SAM, Grounder;
# then the ones that call the others (the batch runner), given their classes.
SERVICES = {
    plan.service: _register(
        plan, ServerHost, {"DEPLOYMENT": plan.name, "CONFIG": plan.config}, models=True
    )
    for plan in PLAN.deployments
    if plan.service is not None and not plan.graph
}
GRAPH_SERVICES = {
    plan.service: _register(
        plan,
        ServerHost,
        {
            "DEPLOYMENT": plan.name,
            "CONFIG": plan.config,
            "ARGS": PLAN.args,
            "SERVICES": dict(SERVICES),
        },
        models=True,
    )
    for plan in PLAN.deployments
    if plan.service is not None and plan.graph
}
# With the batch API on, the ingress reads the batch store, kept on the model-cache Volume.
Ingress, _ = _register(
    PLAN.ingress,
    IngressHost,
    {"ARGS": PLAN.args, "SERVICES": {**SERVICES, **GRAPH_SERVICES}},
    models=False,
    cache=bool(GRAPH_SERVICES),
)
