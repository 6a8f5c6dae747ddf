"""Autoscaling benchmark (issue: KubeRay): seconds from a load step to the extra replica
serving, and from the end of the load to scale-down, on the fake multi-node cluster whose
node types are the pools (see cluster/simulate.py), with the settings used.

    python -m bench.autoscaling [--load-s 60] [--cloud gke]
    python -m bench.autoscaling --check [--runs 2]     # the cost simulator vs the lane
    python -m bench.autoscaling --check --report r1.json --report r2.json   # from reports

``--check`` replays a load step open-loop (``cluster.simulate --replay``), simulates the
same trace with ``cluster.cost`` and writes the error of the simulated replica and node
timelines (section ``cost_check``).

Runs `python -m cluster.simulate` once (a few minutes) and writes its section of
BENCHMARKS.md. Uses Ray's private fake_multinode provider: measured with ray==2.60.0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import table, write_section


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def body(report: dict[str, Any], load: str) -> str:
    settings = report["settings"]
    plans = {p["deployment"]: p for p in settings["plans"]}
    rows = []
    for name, d in report["deployments"].items():
        lo, hi = report["bounds"][name]
        plan = plans.get(name)
        rows.append(
            [
                name,
                report["pool_of"][name],
                f"{lo}..{hi}",
                plan["concurrency"] if plan else "-",
                f"{d['baseline_replicas']} -> {d['peak_running']} -> {d['final_replicas']}",
                _s(d["upscale_decision_s"]),
                _s(d["extra_replica_running_s"]),
                _s(d["extra_replica_serving_s"]),
                _s(d["downscale_decision_after_load_s"]),
                _s(d["replicas_back_after_load_s"]),
                d.get("downscales_during_load", 0),
            ]
        )
    deployments = table(
        [
            "deployment",
            "pool",
            "replicas min..max",
            "clients",
            "running replicas: start -> peak -> end",
            "load step -> Serve decides up (s)",
            "-> extra replica RUNNING (s)",
            "-> extra replica serving (s)",
            "load end -> Serve decides down (s)",
            "load end -> replicas at min (s)",
            "scale-downs during the load",
        ],
        rows,
    )
    pool_rows = [
        [
            pool,
            f"{report['min_nodes'][pool]}..{report['max_nodes'][pool]}",
            f"{p['baseline_nodes']} -> {p['peak_nodes']} -> {p['final_nodes']}",
            _s(p["node_added_s"]),
            _s(p["nodes_back_after_load_s"]),
        ]
        for pool, p in report["pools"].items()
        if pool in report["min_nodes"]
    ]
    pools = table(
        [
            "pool (worker group)",
            "nodes min..max",
            "nodes: start -> peak -> end",
            "load step -> node added (s)",
            "load end -> nodes at min (s)",
        ],
        pool_rows,
    )
    scaling = ", ".join(f"{k} {v:g}" for k, v in settings["serve_autoscaling"].items())
    early = [n for n, d in report["deployments"].items() if d.get("downscales_during_load")]
    early_note = (
        f"\n\nScale-downs during the load ({', '.join(early)}): Serve sizes a deployment by "
        "the requests its replicas hold, and on this box part of the clients wait in the "
        "proxy and the ingress instead; once the extra replicas serve, what reaches them no "
        "longer needs all of them, and Serve removes one after `downscale_delay_s`. A "
        "deployment already back at its minimum when the load ends has no time in the "
        "'load end' columns (or 0-1 s)."
        if early
        else ""
    )
    auto = settings["autoscaler"]
    return f"""
Production graph shape (`cluster/serve-prod.yaml`: GPUs and accelerator types as fake
resources, replica bounds, targets) with the smoke models on the CPU, on a fake multi-node
Ray cluster whose node types are the `{report["cloud"]}` pools (1 A100 per node). Load step:
closed-loop chat-completion clients per model service for {settings["load_s"]:g} s
(`max_tokens` {settings["max_tokens"]}): {settings.get("headroom", 1):g} x the clients that make
Serve want one more replica of each (target_ongoing_requests x (min + 1)), since on this
CPU-starved box part of them wait in the proxy and the ingress; {load}.
"Serving" is the new replica's first completed request (its own access log); for a
deployment that starts from 0 replicas it is its first response.

{deployments}

{pools}{early_note}

Settings: Serve autoscaling ({scaling}); Ray autoscaler {auto["version"]},
AUTOSCALER_UPDATE_INTERVAL_S {auto["AUTOSCALER_UPDATE_INTERVAL_S"]}, idle timeout
{auto["idle_timeout_s"]:g} s. Production uses Serve's defaults for the metrics interval and
look-back, `upscale_delay_s` 30 and `downscale_delay_s` 600 (config), and a 300 s node idle
timeout (RayService `autoscalerOptions`), so there the same steps take minutes longer by
design. The timings include replica cold starts (import torch + load the smoke model) on a
shared 2-core machine, so they vary from run to run.
""".strip()


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.0%}"


def check_body(reports: list[dict[str, Any]]) -> str:
    """The cost simulator against the lane, one row per run and series."""
    rows = []
    totals = []
    for i, report in enumerate(reports, start=1):
        check = report["check"]
        for kind in ("deployments", "pools"):
            for name, r in check[kind].items():
                if r["peak"][0] == r["start"][0] and r["peak"][1] == r["start"][1]:
                    continue  # flat in both: nothing to compare
                rows.append(
                    [
                        i,
                        name,
                        f"{r['real_unit_s']} / {r['sim_unit_s']}",
                        _pct(r["rel_err"]),
                        f"{r['mae']:.2f}",
                        "/".join(str(x) for x in r["peak"]),
                        "/".join("-" if x is None else str(x) for x in r["up_s"]),
                        "/".join("-" if x is None else str(x) for x in r["back_s"]),
                    ]
                )
        rt, nt = check["replicas_total"], check["nodes_total"]
        totals.append(
            f"run {i}: replica-seconds {rt['real_unit_s']} (lane) vs {rt['sim_unit_s']} "
            f"(simulator), {_pct(rt['rel_err'])}, mean MAE {rt['mean_mae']:.2f} replicas; "
            f"node-seconds {nt['real_unit_s']} vs {nt['sim_unit_s']}, {_pct(nt['rel_err'])}, "
            f"mean MAE {nt['mean_mae']:.2f} nodes; inputs measured: service s "
            + ", ".join(f"{k} {v:.1f}" for k, v in check["inputs"]["service_s"].items())
            + "; replica start s "
            + ", ".join(f"{k} {v:.0f}" for k, v in check["inputs"]["replica_start_s"].items())
            + "; node start s "
            + ", ".join(f"{k} {v:.1f}" for k, v in check["inputs"]["node_start_s"].items())
        )
    trace = reports[0]["settings"]["trace"]
    rates = ", ".join(f"{r} {sum(c) / len(c):.2f} req/s" for r, c in trace["arrivals"].items())
    header = [
        "run",
        "deployment / pool",
        "unit-seconds lane / sim",
        "rel. error",
        "MAE",
        "peak lane/sim",
        "up at s lane/sim",
        "back at s lane/sim",
    ]
    return (
        f"The production graph's shape on the fake multi-node cluster (as in the autoscaling "
        f"section), driven open-loop by one trace ({trace['name']}: {rates}, chat "
        f"completions of `max_tokens` {reports[0]['settings']['max_tokens']}), and the same "
        f"trace through `cluster/cost.py`'s KubeRay simulation with the same Serve config "
        f"(the lane's fast autoscaling settings included) and the lane's node idle timeout. "
        f"The simulator's timings are measured in the same run (`cluster/sim_check.py`): "
        f"slot time per deployment from the replicas' access logs, replica start and node "
        f"start from the observed timeline; what is compared is the decisions: replicas per "
        f"deployment and nodes per pool, second by second, from the load step until the lane "
        f"is back at its minimum. Series flat in both are left out.\n\n"
        + table(header, rows)
        + "\n\n"
        + "\n".join(f"- {t}" for t in totals)
    )


def _check(args: argparse.Namespace) -> int:
    reports = [json.loads(Path(p).read_text()) for p in args.report]
    for _ in range(0 if args.report else args.runs):
        workdir = Path(tempfile.mkdtemp(prefix="bench-cost-check-"))
        out = workdir / "report.json"
        cmd = [sys.executable, "-m", "cluster.simulate", "--replay", "--workdir", str(workdir)]
        cmd += ["--out", str(out), "--load-s", str(args.load_s), "--cloud", args.cloud]
        subprocess.run(cmd, check=True)
        reports.append(json.loads(out.read_text()))
        print(f"report: {out}")
    write_section(
        "cost_check", "The cost simulator against the autoscaling lane", check_body(reports)
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.autoscaling")
    parser.add_argument("--load-s", type=float, default=60.0)
    parser.add_argument("--cloud", choices=["gke", "eks"], default="gke")
    parser.add_argument("--check", action="store_true", help="the cost simulator vs the lane")
    parser.add_argument("--runs", type=int, default=1, help="with --check: lane runs")
    parser.add_argument(
        "--report", action="append", default=[], help="with --check: a report already made"
    )
    args = parser.parse_args()
    if args.check:
        return _check(args)
    workdir = Path(tempfile.mkdtemp(prefix="bench-autoscaling-"))
    out = workdir / "report.json"
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "cluster.simulate", "--workdir", str(workdir), "--out", str(out)]
    cmd += ["--load-s", str(args.load_s), "--cloud", args.cloud]
    subprocess.run(cmd, check=True)
    load_after = os.getloadavg()[0]
    report = json.loads(out.read_text())
    load = f"load average {load_before:.1f} before the run, {load_after:.1f} after"
    write_section(
        "autoscaling", "Autoscaling: load step on the simulated node pools", body(report, load)
    )
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
