"""serve-apps: one serving graph (llm, vision, codegen) on Ray Serve, KubeRay and Modal.

Importing the package is cheap: it pulls in no torch, ray, transformers or modal. The
entry point of every runtime is :func:`serve_apps.ray_app.build_app` (Ray Serve) or
``modal_adapter/app.py`` (Modal); both build the same FastAPI app from
:func:`serve_apps.ingress.create_app`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
