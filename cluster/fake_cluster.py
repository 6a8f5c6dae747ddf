"""A local Ray cluster whose worker nodes are the pools of :mod:`cluster.pools`, with
Ray's own autoscaler launching and removing them: the autoscaling simulation.

Ray 2.60's fake multi-node provider (``provider: type: fake_multinode``) starts each
"node" as a set of local Ray processes that advertise the node type's resources (here:
the pool's CPUs, GPUs and marker resource, e.g. ``GPU: 1`` and
``accelerator_type:A100-80G: 1``). The node types and their min/max worker counts are
rendered from the same pool table and the same bounds as the KubeRay worker groups, and
the head, like KubeRay's, advertises no CPU or GPU.

This is a private Ray module: the lane is tested with ray==2.60.0 only. What works there
(see docs/architecture.md): only autoscaler v1, started by
``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=FILE`` (``ray up`` and v2 need
a file the wheel lacks); the YAML must be complete (no defaults are merged), name the head
type ``ray.head.default``, give every type ``max_workers``, and point
``provider.gcs_address`` at our head. The cluster runs in its own session (``setsid``) on
its own ports and temp dir, with a private auth token, and is stopped by signalling the
processes of that session only, never with ``ray stop`` (which kills every Ray on the
machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from serve_apps import dataplane

from .findings import errors
from .placement import GroupBounds, marker_resources
from .pools import Cloud

HEAD_TYPE = "ray.head.default"  # hard-coded by the fake provider for the head node
OBJECT_STORE_BYTES = 100_000_000  # per fake node: keep the box's memory for the replicas


def node_types(groups: list[GroupBounds]) -> dict[str, dict[str, Any]]:
    """The ``available_node_types`` of the fake cluster, one per worker group."""
    types: dict[str, dict[str, Any]] = {
        HEAD_TYPE: {"resources": {"CPU": 0, "GPU": 0}, "node_config": {}, "max_workers": 0}
    }
    for g in groups:
        resources: dict[str, Any] = {"CPU": g.shape.pod_cpus, "GPU": g.shape.gpus}
        resources.update({k: int(v) for k, v in marker_resources(g.pool, g.shape).items()})
        resources["object_store_memory"] = OBJECT_STORE_BYTES
        types[g.pool.name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": g.min_nodes,
            "max_workers": g.max_nodes,
        }
    return types


def fake_cluster_config(
    groups: list[GroupBounds], gcs_address: str, idle_timeout_minutes: float = 0.1
) -> dict[str, Any]:
    """The complete autoscaler config (v1 reads it verbatim: every key it needs)."""
    return {
        "cluster_name": "serve-apps-fake",
        "max_workers": sum(g.max_nodes for g in groups),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "docker": {},
        "head_node_type": HEAD_TYPE,
        "available_node_types": node_types(groups),
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def cluster_groups(config: Mapping[str, Any], cloud: Cloud) -> list[GroupBounds]:
    from .render import RenderError, preflight

    groups, findings = preflight(config, cloud)
    if errors(findings):
        raise RenderError(errors(findings))
    return groups


def fake_cluster_yaml(
    config: Mapping[str, Any], cloud: Cloud, gcs_address: str, idle_timeout_minutes: float = 0.1
) -> str:
    groups = cluster_groups(config, cloud)
    return yaml.safe_dump(
        fake_cluster_config(groups, gcs_address, idle_timeout_minutes), sort_keys=False
    )


def free_port(avoid: set[int]) -> int:
    """A free TCP port outside Ray's worker port range (10002-19999) and ``avoid``."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = int(s.getsockname()[1])
        if port not in avoid and not 10002 <= port <= 19999:
            avoid.add(port)
            return port


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


class FakeCluster:
    """A fake multi-node Ray cluster in its own session; ``with FakeCluster(...) as c:``."""

    def __init__(
        self,
        workdir: Path,
        groups: list[GroupBounds],
        *,
        idle_timeout_minutes: float = 0.1,
        env: Mapping[str, str] | None = None,
    ):
        self.workdir = workdir
        self.groups = groups
        self.idle_timeout_minutes = idle_timeout_minutes
        self.extra_env = dict(env or {})
        self.sid: int | None = None
        ports: set[int] = set()
        self.gcs_port = free_port(ports)
        self.dashboard_port = free_port(ports)
        self.agent_port = free_port(ports)
        self.client_port = free_port(ports)
        self.http_port = free_port(ports)
        # Short: Ray puts unix sockets under it.
        self.temp_dir = Path(f"/tmp/rfk{self.gcs_port}")
        self.token_path = workdir / "auth_token"
        self.ip = ""

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def client_env(self) -> dict[str, str]:
        """What a client of this cluster (ray.init, serve CLI, state API) needs."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_ADDRESS": self.address,
        }

    def start(self) -> None:
        import ray._private.services as services

        self.workdir.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o077)
        try:
            self.token_path.write_text(secrets.token_hex(32))
        finally:
            os.umask(old)
        self.ip = services.get_node_ip_address()
        config_path = self.workdir / "cluster.yaml"
        config_path.write_text(
            yaml.safe_dump(
                fake_cluster_config(self.groups, self.address, self.idle_timeout_minutes),
                sort_keys=False,
            )
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        dataplane.classic(env)  # one HAProxy per fake node would bind the same ports
        env.update(self.extra_env)
        env.update(
            RAY_FAKE_CLUSTER="1",  # the provider refuses to run without it
            AUTOSCALER_UPDATE_INTERVAL_S="1",  # int only; the default is 5
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
        )
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray_bin,
            "start",
            "--head",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.temp_dir}",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--ray-client-server-port={self.client_port}",
            "--num-cpus=0",  # like KubeRay's head: no replica runs there
            "--num-gpus=0",
            f"--object-store-memory={2 * OBJECT_STORE_BYTES}",
            f"--autoscaling-config={config_path}",
            "--disable-usage-stats",
        ]
        log = (self.workdir / "ray_start.log").open("w")
        # start_new_session: `ray start` becomes a session leader; every daemon, the
        # autoscaler and the fake nodes it launches inherit that session id.
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.sid = proc.pid
        if proc.wait(timeout=180) != 0:
            self.stop()
            raise RuntimeError(
                f"ray start failed: {(self.workdir / 'ray_start.log').read_text()[-2000:]}"
            )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM our session's processes, then SIGKILL what is left (gcs_server and the
        autoscaler ignore SIGTERM). Touches no other process."""
        sid, self.sid = self.sid, None
        if sid is None or sid <= 1 or sid == os.getsid(0):
            return
        for pid in session_pids(sid):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            left = [p for p in session_pids(sid) if not _is_stubborn(p)]
            if not left:
                break
            time.sleep(0.5)
        for pid in session_pids(sid):
            _signal(pid, signal.SIGKILL)
        # Keep the logs for a post-mortem next to the report, drop the (socket) temp dir.
        if self.logs.exists():
            shutil.copytree(self.logs, self.workdir / "ray-logs", dirs_exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> FakeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _is_stubborn(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "gcs_server" in cmd or "monitor.py" in cmd
