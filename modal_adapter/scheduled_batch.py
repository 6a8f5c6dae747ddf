"""A batch on a schedule, on Modal: the images in a Volume folder become a batch.

    SERVE_APPS_URL=https://<workspace>--serve-apps-ingress-web.modal.run \\
        modal deploy modal_adapter/scheduled_batch.py

Every day at 02:00 UTC (``modal.Cron``; ``modal.Period(hours=6)`` works the same way) the
function turns the images in the ``serve-apps-batch-inbox`` Volume into batch input lines
(``serve-apps batch images``) and submits them to the deployed app's Batch API
(``serve-apps batch submit``); the app's ``BatchRunner`` class does the work and keeps the
batch in its store. Put images in the inbox with
``modal volume put serve-apps-batch-inbox ./scans /``. The function only submits: it
needs no GPU and ends in seconds.

With auth on (the production config) it submits with an API key of its own, like any
client: ``SERVE_APPS_BATCH_SECRET=serve-apps-batch-key`` at deploy names a
``modal.Secret`` that sets ``OPENAI_API_KEY`` (``serve-apps batch``'s ``--api-key``), e.g.
``modal secret create serve-apps-batch-key OPENAI_API_KEY=sk-...`` for a key
``batch-cron=sk-...`` in the app's ``serve-apps-api-keys`` secret.
"""

from __future__ import annotations

import os

import modal

SCHEDULE = modal.Cron("0 2 * * *")
INBOX = "/inbox"

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("httpx>=0.27", "rich>=13", "pydantic>=2.7")
    .env({"SERVE_APPS_URL": os.environ.get("SERVE_APPS_URL", "")})
    .add_local_python_source("serve_apps")
)
app = modal.App("serve-apps-scheduled-batch", image=image)
inbox = modal.Volume.from_name("serve-apps-batch-inbox", create_if_missing=True)
KEY_SECRET = os.environ.get("SERVE_APPS_BATCH_SECRET", "")
secrets = [modal.Secret.from_name(KEY_SECRET)] if KEY_SECRET else []


@app.function(schedule=SCHEDULE, volumes={INBOX: inbox}, secrets=secrets, timeout=600)
def submit_inbox() -> None:
    from serve_apps.cli import main

    url = os.environ["SERVE_APPS_URL"]
    if not url:
        raise RuntimeError("deploy with SERVE_APPS_URL set to the serve-apps app's URL")
    main(
        [
            "batch",
            "images",
            INBOX,
            "-o",
            "/tmp/input.jsonl",
            "--endpoint",
            "/v1/detect",
            "--categories",
            "text",
        ]
    )
    main(
        [
            "batch",
            "submit",
            "/tmp/input.jsonl",
            "--endpoint",
            "/v1/detect",
            "--metadata",
            "schedule=daily",
            "--base-url",
            url,
        ]
    )
