"""This project vs its simplest peer on the same model directory, side by side in one run.

    python -m bench.peers                       # vs transformers serve; writes BENCHMARKS.md
    python -m bench.peers --levels 1,8 --rounds 1
    python -m bench.peers --classic             # also on Serve's classic proxy (per hop)
    .venv-vllm/bin/python -m bench.peers --peer vllm   # vLLM backend vs `vllm serve`

Peers: ``transformers serve --continuous-batching`` against this project's transformers
backend (section "peers"), and ``vllm serve`` against its vLLM backend (section
"peers_vllm", in the vLLM lane's venv, scripts/setup-vllm). Both servers of a pair run at
once, on the embedded smoke LLM's directory, and get the same requests: streamed chat
completions, sampled (temperature 1, a seed per request), ``max_tokens`` 64. (Greedy, the
random-weight model repeats one whitespace token, which ``transformers serve`` sends as a
single chunk at the end: no inter-token latency.) For each concurrency level the servers
are measured one after the other, in alternating order per round. Reported: generated
tokens/s, time to first token (TTFT) and inter-token latency (ITL) p50/p90, from the
client's side of the HTTP stream.

CPU split (stated in the output): each model computes on one thread. This project: the LLM
replica gets 1 CPU in Ray (Ray sets its ``OMP_NUM_THREADS`` to 1), the ingress 0.1, Serve's
controller and data plane (:mod:`serve_apps.dataplane`) run beside them; each project server
runs in a child process with its own Ray cluster, because the data plane is fixed when Ray
starts. ``transformers serve``: one process with ``OMP_NUM_THREADS=1``. The vLLM pair:
both run vLLM's engine-core process with the same engine arguments (float32, eager, 512 MiB
of KV cache, ``max_num_seqs`` 64) and the same CPU thread setting (``VLLM_CPU_ENV``);
``vllm serve`` adds its API server process, this project its ingress, LLM replica (holding
vLLM's ``AsyncLLM``) and HAProxy.
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

RESULTS = REPO / "bench" / "results"
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


# vLLM's engine arguments, the same for `vllm serve` and this project's vLLM backend.
VLLM_KV_CACHE_BYTES = 512 * 2**20
# Threads of vLLM's CPU worker, for both servers: one compute thread (as the transformers
# pair), bound to no core (cores are shared with everything else on the machine).
VLLM_CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


def project_llm(peer: str, stream_interval: int) -> dict[str, Any]:
    """The LLM's config in the project server: the backend the peer is compared with."""
    llm: dict[str, Any] = {
        "served_model_name": ProjectServer.model,
        "max_batch_size": MAX_BATCH,
        "stream_interval": stream_interval,
    }
    if peer == "vllm":
        llm |= {
            "backend": "vllm",
            "device": "cpu",
            "dtype": "float32",
            "vllm": {"enforce_eager": True, "kv_cache_memory_bytes": VLLM_KV_CACHE_BYTES},
        }
    return llm


def serve_project(port: int, peer: str, stream_interval: int) -> None:
    """The graph on a fresh local Ray cluster, the ingress and the LLM only, on ``port``
    until SIGTERM (run in its own process: Serve's data plane is fixed when Ray starts)."""
    import ray
    from ray import serve

    from serve_apps.ray_app import bind_graph
    from serve_apps.registry import AppArgs

    args = AppArgs.model_validate(
        {
            "llm": project_llm(peer, stream_interval),
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

    def __init__(self, env: dict[str, str], peer: str, stream_interval: int = 1):
        self.env, self.peer, self.stream_interval = env, peer, stream_interval

    def __enter__(self) -> ProjectServer:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.peers", "--serve-project", str(port)),
                *("--peer", self.peer, "--stream-interval", str(self.stream_interval)),
            ],
            cwd=REPO,
            env=self._env(),
            stdout=subprocess.DEVNULL,
            stderr=open(RESULTS / f"serve-apps-{port}.log", "w"),
            start_new_session=True,
        )
        _wait_healthy(self.proc, self.url, f"bench/results/serve-apps-{port}.log")
        return self

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        if self.peer == "vllm":
            env |= VLLM_CPU_ENV
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
    """SIGTERM to the server's main process, which shuts its own children down; then SIGKILL
    to whatever is left of its session (each server is started in a session of its own).
    Only the main process gets the SIGTERM: signalling its process group as well would stop
    Ray's own processes under a project server before it could stop Serve, and Serve's
    HAProxy (in a process group of its own) would outlive them, holding its ports."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    for pid in _session(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _session(sid: int) -> list[int]:
    """The processes of session ``sid`` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids


class PeerServer:
    """A peer's own OpenAI server for ``model_dir``, in its own process group."""

    name = ""
    log = RESULTS / "peer.log"

    def __init__(self, model_dir: Path):
        self.model = str(model_dir)

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1"}

    def __enter__(self) -> PeerServer:
        port = free_port()
        self.proc = subprocess.Popen(
            self.command(port),
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{port}"
        _wait_healthy(self.proc, self.url, str(self.log.relative_to(REPO)))
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc, grace_s=30)


def _cli(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent))
    if exe is None:
        raise SystemExit(f"`{name}` CLI not found beside this Python")
    return exe


class TransformersServe(PeerServer):
    """``transformers serve <dir> --continuous-batching``, one compute thread."""

    name = "transformers serve"
    log = RESULTS / "transformers-serve.log"

    def command(self, port: int) -> list[str]:
        return [
            *(_cli("transformers"), "serve", self.model, "--continuous-batching"),
            *("--device", "cpu", "--host", "127.0.0.1", "--port", str(port)),
        ]

    def env(self) -> dict[str, str]:
        return super().env() | {"OMP_NUM_THREADS": "1"}


# `vllm serve`, the CLI's own main. The CLI asks for the version of the distribution "vllm",
# which fails in the lane: its distribution is "vllm-cpu" (the same package, rebuilt). It gets
# the answer vllm-cpu's own platform check makes up ("<version>+cpu": the CPU platform).
VLLM_CLI = """
import importlib.metadata as md
version = md.version
md.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
from vllm.entrypoints.cli.main import main
main()
"""


class VLLMServe(PeerServer):
    """``vllm serve <dir>`` with the engine arguments of this project's vLLM backend."""

    name = "vllm serve"
    log = RESULTS / "vllm-serve.log"

    def command(self, port: int) -> list[str]:
        return [
            *(sys.executable, "-c", VLLM_CLI, "serve", self.model),
            *("--dtype", "float32", "--enforce-eager"),
            *("--kv-cache-memory-bytes", str(VLLM_KV_CACHE_BYTES)),
            *("--max-num-seqs", str(MAX_BATCH), "--disable-log-stats"),
            *("--structured-outputs-config.backend", "guidance"),
            *("--host", "127.0.0.1", "--port", str(port)),
        ]

    def env(self) -> dict[str, str]:
        return super().env() | VLLM_CPU_ENV


PEERS: dict[str, type[PeerServer]] = {"transformers": TransformersServe, "vllm": VLLMServe}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--peer",
        choices=sorted(PEERS),
        default="transformers",
        help="transformers: the transformers backend vs `transformers serve`; vllm: the vLLM "
        "backend vs `vllm serve` (run with the vLLM lane's Python, .venv-vllm)",
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
    # The smoke model's cache, as the tests of each lane (scripts/test, scripts/test-vllm):
    # set before anything imports the settings, inherited by the project servers.
    cache = "serve_apps-vllm" if opts.peer == "vllm" else "serve_apps"
    os.environ.setdefault("SERVE_APPS_CACHE_DIR", str(REPO / ".cache" / cache))
    if opts.serve_project:
        serve_project(opts.serve_project, opts.peer, opts.stream_interval)
        return
    levels = [int(x) for x in opts.levels.split(",")]

    from serve_apps.config import Settings
    from serve_apps.engines.smoke import smoke_llm_path

    RESULTS.mkdir(parents=True, exist_ok=True)
    model_dir = smoke_llm_path(Settings().cache_dir)
    results: dict[tuple[str, int], list[Run]] = {}
    peer = PEERS[opts.peer](model_dir)
    variants = {"serve-apps": ProjectServer(DATA_PLANES["serve-apps"], opts.peer)}
    if opts.classic:
        name = "serve-apps, classic proxy"
        variants[name] = ProjectServer(DATA_PLANES[name], opts.peer)
    if opts.stream_interval > 1:
        name = f"serve-apps, stream_interval {opts.stream_interval}"
        variants[name] = ProjectServer(DATA_PLANES["serve-apps"], opts.peer, opts.stream_interval)
    with contextlib.ExitStack() as stack:
        servers: dict[str, Any] = {n: stack.enter_context(v) for n, v in variants.items()}
        servers[peer.name] = stack.enter_context(peer)
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


PEER_NOTES = {
    "transformers": (
        "peers",
        "This project vs transformers serve (continuous batching), same model, same requests",
        "serve-apps runs its transformers backend. transformers serve: one process, "
        "OMP_NUM_THREADS=1, `--continuous-batching` with its default paged-cache settings.",
    ),
    "vllm": (
        "peers_vllm",
        "This project's vLLM backend vs vllm serve, same model, same requests (vLLM lane)",
        "serve-apps runs its vLLM backend (`backend: vllm`, vllm-cpu in .venv-vllm). Both it "
        "and vllm serve: float32, `enforce_eager`, `kv_cache_memory_bytes` "
        f"{VLLM_KV_CACHE_BYTES // 2**20} MiB, max_num_seqs {MAX_BATCH}, llguidance for "
        "structured outputs, one engine-core process each with "
        + ", ".join(f"{k}={v}" for k, v in VLLM_CPU_ENV.items())
        + ". vllm serve: its API server process in front of the engine core; serve-apps: "
        "the ingress, the LLM replica holding vLLM's AsyncLLM, and HAProxy.",
    ),
}


def report(results: dict[tuple[str, int], list[Run]], levels: list[int], opts: Any) -> None:
    section, title, setup = PEER_NOTES[opts.peer]
    peer = PEERS[opts.peer].name
    names = list(dict.fromkeys(name for name, _ in results))
    rows = []
    for c in levels:
        theirs = median([r.tokens_per_s for r in results[(peer, c)]])
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
        section,
        title,
        table(
            [
                "concurrent",
                "server",
                "tok/s",
                f"vs {peer}",
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
        f"proxy actor in front instead. max_batch_size {MAX_BATCH}. " + setup,
    )


if __name__ == "__main__":
    main()
