"""The HTTP API, one module per family, each a thin ``APIRouter`` over its logic.

Every module has ``router(ctx: AppContext) -> APIRouter``; the registry says which
families a service contributes (``ServiceSpec.routers``) and ``create_app`` mounts the
ones of the services a config turns on. Wire models live in :mod:`serve_apps.schemas`
(shared with the replicas); errors are raised as :mod:`serve_apps.errors` exceptions and
turned into the envelope by the app's one error map.

- :mod:`.health`: ``/health`` (readiness and liveness), on every app;
- :mod:`.openai`: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``;
- :mod:`.generate`: ``/v1/generate`` (constrained generation);
- :mod:`.vision`: ``/v1/detect``, ``/v1/segment``, ``/v1/ground``.
"""
