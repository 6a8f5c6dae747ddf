"""schemathesis over the served OpenAPI document, through real Ray Serve and HTTP: every
route, generated inputs (valid and invalid), and no answer may be a 5xx, an undocumented
status, or a body outside the documented schema (the error envelope included).

schemathesis' own CLI drives it (its pytest plugin does not load under pytest 9.2:
``AttributeError: 'Function' object has no attribute '_nodeid'``), with a fixed seed so a
failure reproduces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONTRACT_HEADERS

pytestmark = pytest.mark.ray

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance"
)


def test_no_generated_request_gets_a_server_error(ray_serve_url):
    exe = Path(sys.executable).with_name("schemathesis")
    # The contract app has auth on: every case carries its key.
    headers = [
        arg for name, value in CONTRACT_HEADERS.items() for arg in ("-H", f"{name}: {value}")
    ]
    done = subprocess.run(
        [
            str(exe),
            "run",
            f"{ray_serve_url}/openapi.json",
            *headers,
            "--checks",
            CHECKS,
            "--max-examples",
            "8",
            "--seed",
            "0",
            "--generation-deterministic",
            "--request-timeout",
            "120",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert " passed" in output and "generated" in output, output[-2000:]
