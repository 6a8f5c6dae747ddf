"""Reliability under bad input, load and faults, through real Ray Serve over HTTP.

    python -m bench.reliability all --label after       # run every probe, keep the results
    python -m bench.reliability report                  # BENCHMARKS.md: before vs after

Each probe deploys the graph (LLM and Codegen on the smoke model; vision off) on a fresh
local Ray cluster and drives it over HTTP, as a client would:

- ``poison``: 7 valid chat requests batched with one whose temperature is 1e-300;
- ``bigprompt``: six 12 MiB prompts while a probe measures a short request's latency, and
  the LLM replica's RSS before and after;
- ``deepjson``: a body nested 600 deep in an unknown field;
- ``constraints``: constraints past llguidance's limits (10,000 properties, ``(a{1000}){1000}``,
  20,000 alternatives, ``{"$ref": "#"}``): status and seconds;
- ``burst``: 200 chat requests at once against a bounded queue, client timeout 60 s;
- ``kill``: steady load on an LLM deployment of 2 replicas, one replica killed after 10 s;
- ``fuzz``: schemathesis over /openapi.json (every route), count of 5xx.

Results go to ``bench/results/reliability-<label>.json``; ``report`` writes the section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import REPO, free_port, percentile, table, write_section

RESULTS = REPO / "bench" / "results"
ARGS: dict[str, Any] = {
    "llm": {"served_model_name": "smoke-llm", "default_max_tokens": 16, "max_batch_size": 8},
    "codegen": {"served_model_name": "smoke-codegen", "default_max_tokens": 32},
    "detector": None,
    "sam": None,
    "grounder": None,
    "limits": {"max_tokens": 512},
}
# As in config.yaml: a bounded queue at the caller of each model deployment.
OPTIONS: dict[str, dict[str, Any]] = {
    "LLM": {"max_ongoing_requests": 32, "max_queued_requests": 64},
    "Codegen": {"max_ongoing_requests": 32, "max_queued_requests": 64},
}


def chat(content: str = "Say something.", **kw: Any) -> dict[str, Any]:
    return {"model": "smoke-llm", "messages": [{"role": "user", "content": content}], **kw}


class Graph:
    """A local Ray cluster with the graph deployed; ``url`` is its HTTP address."""

    def __init__(self, options: dict[str, dict[str, Any]] | None = None):
        self.options = {**OPTIONS, **(options or {})}

    def __enter__(self) -> Graph:
        import ray
        from ray import serve

        from serve_apps.ray_app import bind_graph
        from serve_apps.registry import AppArgs

        os.environ.setdefault("SERVE_APPS_CACHE_DIR", str(REPO / ".cache" / "serve_apps"))
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(bind_graph(AppArgs.model_validate(ARGS), self.options), route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()

    @staticmethod
    def replicas(deployment: str) -> list[str]:
        import ray

        return sorted(
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]
        )

    @staticmethod
    def rss_mib(replica: str) -> float:
        import ray

        actor = ray.get_actor(replica, namespace="serve")
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


async def post(client: Any, path: str, body: Any, timeout: float = 120) -> tuple[int, float, Any]:
    """(status, seconds, body or error text); status 0 when the client gave up. A 503/504
    without ``Retry-After`` is recorded with the code ``no-retry-after``."""
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post(path, json=body, timeout=timeout)
    except httpx.TimeoutException:
        return 0, time.perf_counter() - t0, "client timeout"
    try:
        payload: Any = r.json()
    except ValueError:
        payload = r.text[:200]
    if r.status_code in (503, 504) and "retry-after" not in r.headers:
        payload = {"error": {"code": "no-retry-after"}}
    return r.status_code, time.perf_counter() - t0, payload


def code_of(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("code"))
    return "-"


# ----------------------------------------------------------------------------- probes
async def probe_poison(url: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=url) as c:
        bodies = [chat(max_tokens=24, temperature=1.0, seed=i) for i in range(7)]
        bodies.insert(3, chat(max_tokens=24, temperature=1e-300))
        results = await asyncio.gather(*(post(c, "/v1/chat/completions", b) for b in bodies))
    poison = results.pop(3)
    return {
        "poison_status": poison[0],
        "valid_statuses": dict(Counter(str(r[0]) for r in results)),
    }


async def probe_bigprompt(url: str) -> dict[str, Any]:
    import httpx

    replica = Graph.replicas("LLM")[0]
    before = Graph.rss_mib(replica)
    big = "word " * (12 * 2**20 // 5)
    probe_latencies: list[float] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=url) as c:

        async def prober() -> None:
            while not done.is_set():
                _, seconds, _ = await post(c, "/v1/chat/completions", chat(max_tokens=8))
                probe_latencies.append(seconds)
                await asyncio.sleep(0.2)

        task = asyncio.create_task(prober())
        big_results = []
        for _ in range(6):
            status, seconds, payload = await post(c, "/v1/chat/completions", chat(big), 180)
            big_results.append((status, seconds, code_of(payload)))
        done.set()
        await task
    after = Graph.rss_mib(replica)
    return {
        "big_statuses": dict(Counter(f"{s} {code}" for s, _, code in big_results)),
        "big_seconds_p50": percentile([s for _, s, _ in big_results], 0.5),
        "probe_p50_s": percentile(probe_latencies, 0.5),
        "probe_max_s": max(probe_latencies, default=float("nan")),
        "rss_before_mib": before,
        "rss_after_mib": after,
    }


async def probe_deepjson(url: str) -> dict[str, Any]:
    import httpx

    nested: Any = 1
    for _ in range(600):
        nested = [nested]
    async with httpx.AsyncClient(base_url=url) as c:
        status, _, payload = await post(c, "/v1/chat/completions", chat(max_tokens=4, x=nested))
        schema: Any = {"type": "string"}
        for _ in range(300):
            schema = {"type": "array", "items": schema}
        gen = {"prompt": "p", "constraints": {"json_schema": schema}, "max_tokens": 4}
        status2, _, payload2 = await post(c, "/v1/generate", gen)
    return {
        "extra_field_600_deep": f"{status} {code_of(payload)}",
        "schema_300_deep": f"{status2} {code_of(payload2)}",
    }


def constraint_cases() -> dict[str, dict[str, Any]]:
    wide = {
        "type": "object",
        "properties": {f"p{i}": {"type": "integer"} for i in range(10_000)},
    }
    grammar = "start: " + " | ".join(f'"w{i}"' for i in range(20_000))
    return {
        "schema_10000_properties": {"json_schema": wide},
        "regex_(a{1000}){1000}": {"regex": "(a{1000}){1000}"},
        "grammar_20000_alternatives": {"grammar": grammar},
        'schema_{"$ref":"#"}': {"json_schema": {"$ref": "#"}},
    }


async def probe_constraints(url: str) -> dict[str, Any]:
    import httpx

    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url) as c:
        for name, constraint in constraint_cases().items():
            body = {"prompt": "Go:", "constraints": constraint, "max_tokens": 16}
            status, seconds, payload = await post(c, "/v1/generate", body, 300)
            detail = code_of(payload)
            if status == 200:
                text, ok = payload["generated_text"], payload["constraint_satisfied"]
                detail = f"text {text!r} satisfied {ok}"
            out[name] = {"status": status, "seconds": round(seconds, 2), "detail": detail}
    return out


async def probe_burst(url: str, n: int = 200, client_timeout: float = 60) -> dict[str, Any]:
    import httpx

    replica = Graph.replicas("LLM")[0]
    rss = [Graph.rss_mib(replica)]
    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits) as c:
        sampling = asyncio.Event()

        async def sample_rss() -> None:
            while not sampling.is_set():
                rss.append(Graph.rss_mib(replica))
                await asyncio.sleep(1)

        sampler = asyncio.create_task(sample_rss())
        results = await asyncio.gather(
            *(
                post(c, "/v1/chat/completions", chat(max_tokens=64), client_timeout)
                for _ in range(n)
            )
        )
        sampling.set()
        await sampler
    by_status: dict[str, list[float]] = {}
    for status, seconds, payload in results:
        by_status.setdefault(f"{status} {code_of(payload)}", []).append(seconds)
    return {
        "requests": n,
        "client_timeout_s": client_timeout,
        "statuses": {k: len(v) for k, v in sorted(by_status.items())},
        "latency_p50_p99_s": {
            k: [round(percentile(v, 0.5), 2), round(percentile(v, 0.99), 2)]
            for k, v in sorted(by_status.items())
        },
        "max_rss_mib": max(rss),
    }


async def probe_kill(url: str, seconds: float = 40, kill_at: float = 10) -> dict[str, Any]:
    import httpx
    import ray

    results: list[tuple[float, int, str]] = []
    stop = time.perf_counter() + seconds
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url) as c:

        async def worker() -> None:
            while time.perf_counter() < stop:
                status, _, payload = await post(c, "/v1/chat/completions", chat(max_tokens=32), 60)
                results.append((time.perf_counter() - t0, status, code_of(payload)))

        async def killer() -> float:
            await asyncio.sleep(kill_at)
            victim = Graph.replicas("LLM")[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            return time.perf_counter() - t0

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        killed_at = await killer()
        await asyncio.gather(*workers)
    failed = [(t, s, code) for t, s, code in results if s != 200]
    after = [t for t, s, _ in results if t > killed_at]
    return {
        "requests": len(results),
        "failed": dict(Counter(f"{s} {code}" for _, s, code in failed)),
        "killed_at_s": round(killed_at, 1),
        "last_failure_after_kill_s": round(
            max((t for t, *_ in failed), default=killed_at) - killed_at, 1
        ),
        "requests_after_kill": len(after),
    }


def probe_fuzz(url: str, examples: int = 30) -> dict[str, Any]:
    """schemathesis' CLI over the served spec (positive and negative cases)."""
    exe = Path(sys.executable).with_name("schemathesis")
    proc = subprocess.run(
        [
            str(exe),
            "run",
            f"{url}/openapi.json",
            "--max-examples",
            str(examples),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance",
            "--request-timeout",
            "120",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    text = proc.stdout + proc.stderr
    cases = re.search(r"(\d+) generated", text)
    failures = {
        check: len(re.findall(rf"\b{check}\b", text))
        for check in ("Server error", "Undocumented HTTP status code", "Response violates schema")
    }
    return {
        "exit": proc.returncode,
        "cases": int(cases.group(1)) if cases else None,
        "failures": failures,
        "summary": [
            line for line in text.splitlines() if re.search(r"\d+ (passed|failed|generated)", line)
        ][-4:],
    }


PROBES = ["poison", "bigprompt", "deepjson", "constraints", "burst", "kill", "fuzz"]


def run(probes: list[str], label: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"reliability-{label}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for name in probes:
        options = {"LLM": {**OPTIONS["LLM"], "num_replicas": 2}} if name == "kill" else None
        with Graph(options) as graph:
            t0 = time.perf_counter()
            if name == "fuzz":
                result = probe_fuzz(graph.url)
            else:
                result = asyncio.run(globals()[f"probe_{name}"](graph.url))
            result["probe_seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = result
        print(name, json.dumps(result, indent=1), flush=True)
        path.write_text(json.dumps(results, indent=1))


def summary(name: str, r: dict[str, Any]) -> str:
    """One readable cell for a probe's result (the JSON file keeps everything)."""
    if not r:
        return "not run"
    if name == "poison":
        return f"poison request {r['poison_status']}; the 7 batched with it: {r['valid_statuses']}"
    if name == "bigprompt":
        return (
            f"6 x 12 MiB prompts: {r['big_statuses']}, p50 {r['big_seconds_p50']:.2f} s each; "
            f"a short request meanwhile: p50 {r['probe_p50_s']:.2f} s, max "
            f"{r['probe_max_s']:.2f} s; LLM replica RSS {r['rss_before_mib']:.0f} -> "
            f"{r['rss_after_mib']:.0f} MiB"
        )
    if name == "deepjson":
        deep, schema = r["extra_field_600_deep"], r["schema_300_deep"]
        return f"600-deep extra field: {deep}; 300-deep schema: {schema}"
    if name == "constraints":
        return "; ".join(
            f"{case}: {v['status']} {v['detail']} in {v['seconds']} s"
            for case, v in r.items()
            if isinstance(v, dict)
        )
    if name == "burst":
        return (
            f"{r['requests']} at once: {r['statuses']}; p50/p99 s by status "
            f"{r['latency_p50_p99_s']}; max RSS {r['max_rss_mib']:.0f} MiB"
        )
    if name == "kill":
        return (
            f"{r['requests']} requests, one of 2 replicas killed at {r['killed_at_s']} s: "
            f"failed {r['failed'] or 'none'}, last failure {r['last_failure_after_kill_s']} s "
            f"after the kill, {r['requests_after_kill']} requests after it"
        )
    if name == "fuzz":
        return f"{r['cases']} cases, failures {r['failures']} (exit {r['exit']})"
    return json.dumps(r)


def report() -> None:
    before = json.loads((RESULTS / "reliability-before.json").read_text())
    after = json.loads((RESULTS / "reliability-after.json").read_text())
    rows = [
        [name, summary(name, before.get(name, {})), summary(name, after.get(name, {}))]
        for name in PROBES
    ]
    write_section(
        "reliability",
        "Reliability: bad input, bursts and a killed replica, before and after",
        "Before: the tree before issue 10 (commit ae85b5f); after: this tree. Each probe "
        "on a fresh local Ray cluster, LLM on the smoke model (see bench/reliability.py).\n\n"
        + table(["probe", "before", "after"], rows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", choices=[*PROBES, "all", "report"])
    parser.add_argument("--label", default="after")
    opts = parser.parse_args()
    if opts.which == "report":
        report()
    else:
        run(PROBES if opts.which == "all" else [opts.which], opts.label)


if __name__ == "__main__":
    main()
