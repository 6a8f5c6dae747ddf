"""The wire contract: pydantic models of every request and response. Imports nothing heavy.

- :mod:`.common` — base classes and the constraint object shared by several APIs;
- :mod:`.openai` — OpenAI-compatible chat/completions/models;
- :mod:`.generate` — the constrained-codegen API (``POST /v1/generate``).
"""
