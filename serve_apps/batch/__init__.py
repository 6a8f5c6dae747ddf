"""Batch jobs on the graph: the OpenAI Batch API, a durable store, a runner deployment.

- :mod:`.store`: SQLite + files (batches, line results, uploaded and produced files);
- :mod:`.lines`: the input line checks and OpenAI's output line format;
- :mod:`.runner`: ``BatchConfig`` (the ``batch:`` section), ``BatchRunner`` (the server of
  the ``BatchRunner`` deployment), ``BatchClient``;
- :mod:`.webhooks`: signed completion webhooks under the ``image_url`` address policy.

The HTTP routes are in :mod:`serve_apps.routers.batch`, the CLI in :mod:`serve_apps.cli`.
"""
