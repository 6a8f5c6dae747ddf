"""This project vs ``transformers serve --continuous-batching`` on the same model directory.

    python -m bench.peers                       # concurrency 1, 8, 32, 64; writes BENCHMARKS.md
    python -m bench.peers --levels 1,8 --rounds 1
    python -m bench.peers --classic             # also on Serve's classic proxy (per hop)

Both servers run side by side in one run, on the embedded smoke LLM's directory, and get
the same requests: streamed chat completions, sampled (temperature 1, a seed per request),
``max_tokens`` 64. (Greedy, the random-weight model repeats one whitespace token, which
``transformers serve`` sends as a single chunk at the end: no inter-token latency.)
For each concurrency level the two are measured one after the other, in
alternating order per round. Reported: generated tokens/s, time to first token (TTFT) and
inter-token latency (ITL) p50/p90, from the client's side of the HTTP stream.

CPU split (stated in the output): each model computes on one thread. This project: the LLM
replica gets 1 CPU in Ray (Ray sets its ``OMP_NUM_THREADS`` to 1), the ingress 0.1, Serve's
controller and data plane (:mod:`serve_apps.dataplane`) run beside them; each project server
runs in a child process with its own Ray cluster, because the data plane is fixed when Ray
starts. ``transformers serve``: one process with ``OMP_NUM_THREADS=1``. (The vLLM pair,
this project's vLLM backend vs ``vllm serve``, is not here: it needs the vLLM lane's venv
and a machine where both fit.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, free_port, median, percentile, table, write_section
from serve_apps import dataplane

os.environ.setdefault("SERVE_APPS_CACHE_DIR", str(REPO / ".cache" / "serve_apps"))

LOG = REPO / "bench" / "results" / "transformers-serve.log"
MAX_TOKENS = 64
MAX_BATCH = 64  # both servers may batch every concurrent request of the largest level


@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


async def load(url: str, model: str, concurrency: int, requests: int) -> Run:
    """``requests`` streamed chat completions, ``concurrency`` at a time."""
    import httpx

    run = Run()
    todo = list(range(requests))
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int) -> None:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"Tell me story number {i}."}],
                "max_tokens": MAX_TOKENS,
                "temperature": 1.0,
                "seed": i,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            t0 = time.perf_counter()
            arrivals: list[float] = []
            usage = None
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    run.errors += 1
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    choices = chunk.get("choices") or []
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        arrivals.append(time.perf_counter())
            if not arrivals:
                run.errors += 1
                return
            run.ttft.append(arrivals[0] - t0)
            run.itl.extend(b - a for a, b in itertools.pairwise(arrivals))
            run.tokens += usage["completion_tokens"] if usage else len(arrivals)

        async def worker() -> None:
            while todo:
                await one(todo.pop())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.seconds = time.perf_counter() - t0
    return run


# Serve's data plane: as shipped (serve_apps.dataplane: direct ingress, HAProxy, gRPC between
# deployments) and Serve's classic Python proxy, for the per-hop comparison (--classic).
DATA_PLANES: dict[str, dict[str, str]] = {
    "serve-apps": dict(dataplane.SERVE_ENV),
    "serve-apps, classic proxy": {name: "0" for name in dataplane.SERVE_ENV},
}


def serve_project(port: int, stream_interval: int) -> None:
    """The graph on a fresh local Ray cluster, the ingress and the LLM only, on ``port``
    until SIGTERM (run in its own process: Serve's data plane is fixed when Ray starts)."""
    import ray
    from ray import serve

    from serve_apps.ray_app import bind_graph
    from serve_apps.registry import AppArgs

    args = AppArgs.model_validate(
        {
            "llm": {
                "served_model_name": ProjectServer.model,
                "max_batch_size": MAX_BATCH,
                "stream_interval": stream_interval,
            },
            "codegen": None,
            "detector": None,
            "sam": None,
            "grounder": None,
        }
    )
    options = {
        "LLM": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 256},
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 256},
    }
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(bind_graph(args, options), name="bench", route_prefix="/")
        while not stop:
            time.sleep(0.2)
    finally:
        # Also after a failed start: Serve stops its HAProxy, which Ray's own exit would
        # leave running (orphaned, holding its ports).
        serve.shutdown()
        ray.shutdown()


class ProjectServer:
    """This project's graph in a child process (``serve_project``) with one data plane."""

    model = "smoke-llm"

    def __init__(self, env: dict[str, str], stream_interval: int = 1):
        self.env, self.stream_interval = env, stream_interval

    def __enter__(self) -> ProjectServer:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.peers", "--serve-project", str(port)),
                *("--stream-interval", str(self.stream_interval)),
            ],
            cwd=REPO,
            env=self._env(),
            stdout=subprocess.DEVNULL,
            stderr=open(REPO / "bench" / "results" / f"serve-apps-{port}.log", "w"),
            start_new_session=True,
        )
        _wait_healthy(self.proc, self.url, f"bench/results/serve-apps-{port}.log")
        return self

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        dataplane.own_ports(env)  # several project servers run at once here
        return env

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc, grace_s=90)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: str) -> None:
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server did not become healthy in 300 s; see {log}")


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


class TransformersServe:
    """``transformers serve <dir> --continuous-batching`` in its own process group."""

    def __init__(self, model_dir: Path):
        self.model = str(model_dir)

    def __enter__(self) -> TransformersServe:

        exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
        if exe is None:
            raise SystemExit("`transformers` CLI not found beside this Python")
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [
                exe,
                "serve",
                self.model,
                "--continuous-batching",
                "--device",
                "cpu",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(LOG, "w"),
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{port}"
        _wait_healthy(self.proc, self.url, "bench/results/transformers-serve.log")
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc, grace_s=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2, help="requests per concurrent slot")
    parser.add_argument(
        "--classic",
        action="store_true",
        help="also run this project on Serve's classic Python proxy (the per-hop comparison)",
    )
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        metavar="N",
        help="also run this project with stream_interval N (tokens per streamed chunk)",
    )
    parser.add_argument("--serve-project", type=int, metavar="PORT", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve_project:
        serve_project(opts.serve_project, opts.stream_interval)
        return
    levels = [int(x) for x in opts.levels.split(",")]

    from serve_apps.config import Settings
    from serve_apps.engines.smoke import smoke_llm_path

    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    model_dir = smoke_llm_path(Settings().cache_dir)
    results: dict[tuple[str, int], list[Run]] = {}
    variants = {"serve-apps": ProjectServer(DATA_PLANES["serve-apps"])}
    if opts.classic:
        name = "serve-apps, classic proxy"
        variants[name] = ProjectServer(DATA_PLANES[name])
    if opts.stream_interval > 1:
        name = f"serve-apps, stream_interval {opts.stream_interval}"
        variants[name] = ProjectServer(DATA_PLANES["serve-apps"], opts.stream_interval)
    with contextlib.ExitStack() as stack:
        servers: dict[str, Any] = {n: stack.enter_context(v) for n, v in variants.items()}
        servers["transformers serve"] = stack.enter_context(TransformersServe(model_dir))
        for server in servers.values():  # warm-up: first requests compile and allocate
            asyncio.run(load(server.url, server.model, 8, 16))
        for r in range(opts.rounds):
            for c in levels:
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    server = servers[name]
                    run = asyncio.run(load(server.url, server.model, c, max(8, opts.requests * c)))
                    results.setdefault((name, c), []).append(run)
                    print(f"round {r} c={c} {name}: {run.tokens_per_s:.0f} tok/s", flush=True)
    report(results, levels, opts)


def report(results: dict[tuple[str, int], list[Run]], levels: list[int], opts: Any) -> None:
    names = list(dict.fromkeys(name for name, _ in results))
    rows = []
    for c in levels:
        theirs = median([r.tokens_per_s for r in results[("transformers serve", c)]])
        for name in names:
            runs = results[(name, c)]
            tps = median([r.tokens_per_s for r in runs])
            ttft = [x for r in runs for x in r.ttft]
            itl = [x for r in runs for x in r.itl]
            rows.append(
                [
                    c,
                    name,
                    tps,
                    f"**{tps / theirs:.2f}**",
                    f"{percentile(ttft, 0.5) * 1e3:.0f} / {percentile(ttft, 0.9) * 1e3:.0f}",
                    f"{percentile(itl, 0.5) * 1e3:.1f} / {percentile(itl, 0.9) * 1e3:.1f}",
                    sum(r.errors for r in runs),
                ]
            )
    write_section(
        "peers",
        "This project vs transformers serve (continuous batching), same model, same requests",
        table(
            [
                "concurrent",
                "server",
                "tok/s",
                "vs transformers serve",
                "TTFT p50 / p90 ms",
                "ITL p50 / p90 ms",
                "errors",
            ],
            rows,
        )
        + "\n\n- model: the embedded smoke LLM directory (Qwen2 architecture, random weights), "
        "streamed chat completions, temperature 1 with a seed per request, "
        f"max_tokens {MAX_TOKENS}; {opts.rounds} rounds, alternating order; tokens/s is the "
        "median of rounds; every server runs for the whole run (idle while another is measured).\n"
        "- CPU split: each model computes on one thread. serve-apps: LLM replica `num_cpus: 1` "
        "(Ray sets OMP_NUM_THREADS=1), ingress 0.1, Serve's controller beside them; its data "
        "plane as shipped (serve_apps.dataplane: HAProxy in front of the ingress replica's own "
        "HTTP server, gRPC from the LLM replica to the ingress); `classic proxy`: Serve's Python "
        f"proxy actor in front instead. max_batch_size {MAX_BATCH}. transformers serve: one "
        "process, OMP_NUM_THREADS=1, `--continuous-batching` with its default paged-cache "
        "settings.",
    )


if __name__ == "__main__":
    main()
