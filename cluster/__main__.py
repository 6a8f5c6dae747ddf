"""``python -m cluster``: lint a Serve config, render the KubeRay manifests, render the
fake multi-node cluster config.

    python -m cluster lint FILE [FILE ...]           strict lint; exit 1 on any error
    python -m cluster render [--config FILE] --cloud gke|eks [-o OUT]
                                                     one RayService (base + that cloud's workers)
    python -m cluster render --k8s [--check]         write (or check) the k8s/ tree
    python -m cluster fake-cluster [--config FILE] [--cloud gke] --gcs-address HOST:PORT
                                                     the fake_multinode autoscaler YAML
    python -m cluster plan [--config FILE]           the worker-group bounds and why
    python -m cluster check-capacity [--config FILE] [--address auto]
                                                     before `serve run` on a running Ray
                                                     cluster: exit 1 naming a resource no
                                                     node has (Serve would wait forever)
    python -m cluster cost [--config FILE] (--trace CSV | --shape SHAPE --rps R)
                           [--prices FILE] [--service-time NAME=S] [--plot PNG]
                                                     cost per target and service, break-even
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cost_inputs import SHAPES
from .findings import errors
from .pools import CLOUDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    lint = sub.add_parser("lint", help="strict lint of Serve config files")
    lint.add_argument("files", nargs="+", type=Path)

    render = sub.add_parser("render", help="render the RayService / the k8s/ tree")
    render.add_argument(
        "--config", type=Path, default=None, help="default: cluster/serve-prod.yaml"
    )
    render.add_argument("--cloud", choices=CLOUDS)
    render.add_argument("-o", "--output", type=Path)
    render.add_argument("--k8s", action="store_true", help="write the whole k8s/ tree")
    render.add_argument("--check", action="store_true", help="with --k8s: fail on drift")

    fake = sub.add_parser("fake-cluster", help="render the fake_multinode cluster YAML")
    fake.add_argument("--config", type=Path, default=None)
    fake.add_argument("--cloud", choices=CLOUDS, default="gke")
    fake.add_argument("--gcs-address", required=True)
    fake.add_argument("-o", "--output", type=Path)

    plan_cmd = sub.add_parser("plan", help="worker-group bounds per cloud, with the reasons")
    plan_cmd.add_argument("--config", type=Path, default=None)

    capacity = sub.add_parser(
        "check-capacity", help="can the running Ray cluster's nodes host every deployment?"
    )
    capacity.add_argument("--config", type=Path, default=None)
    capacity.add_argument("--address", default="auto", help="the Ray cluster (default: auto)")
    cost = sub.add_parser("cost", help="simulate a load trace's cost on KubeRay and Modal")
    cost.add_argument("--config", type=Path, default=None, help="default: cluster/serve-prod.yaml")
    cost.add_argument("--trace", type=Path, help="CSV: timestamp,route,count")
    cost.add_argument("--shape", default="steady", help="built-in trace: " + ", ".join(SHAPES))
    cost.add_argument("--rps", type=float, default=1.0, help="built-in trace's mean req/s")
    cost.add_argument("--mix", default=None, help="built-in trace's routes: chat=0.7,generate=0.3")
    cost.add_argument("--prices", type=Path, default=None, help="default: cluster/prices.yaml")
    cost.add_argument(
        "--service-time",
        action="append",
        default=[],
        metavar="NAME=S",
        help="seconds one request holds a slot of deployment NAME (measured: bench/)",
    )
    cost.add_argument(
        "--replica-start",
        action="append",
        default=[],
        metavar="NAME=S",
        help="seconds from placing a replica of NAME on a node that is up to it serving",
    )
    cost.add_argument(
        "--node-start",
        action="append",
        default=[],
        metavar="POOL=S",
        help="seconds from a node request in POOL to the node joining (KubeRay)",
    )
    cost.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="S",
        help="KubeRay's node idle timeout (default: the rendered idleTimeoutSeconds)",
    )
    cost.add_argument("--cloud", choices=CLOUDS, action="append", help="default: both")
    cost.add_argument("--plot", type=Path, help="write a PNG (needs the `cost` extra)")
    cost.add_argument(
        "--node-discount",
        type=float,
        default=0.0,
        help="share off every KubeRay node's list price (spot ~0.6); Modal stays at list",
    )
    cost.add_argument("--no-break-even", action="store_true", help="skip the break-even search")

    args = parser.parse_args(argv)
    if args.command == "cost":
        return _cost(args)
    if args.command == "lint":
        return _lint(args.files)
    if args.command == "render":
        return _render(args)
    if args.command == "fake-cluster":
        return _fake(args)
    if args.command == "check-capacity":
        return _capacity(args)
    return _plan(args)


def _lint(files: list[Path]) -> int:
    from .lint import lint_file

    failed = False
    for path in files:
        findings = lint_file(path)
        for f in findings:
            print(f"{path}: {f}")
        n_err = len(errors(findings))
        print(f"{path}: {n_err} error(s), {len(findings) - n_err} warning(s)")
        failed |= n_err > 0
    return 1 if failed else 0


def _render(args: argparse.Namespace) -> int:
    from .render import (
        PROD_CONFIG,
        RenderError,
        drift,
        load_config,
        render_rayservice,
        render_tree,
        to_yaml,
        write_tree,
    )

    config_path = args.config or PROD_CONFIG
    try:
        if args.k8s:
            files = render_tree(config_path)
            if args.check:
                problems = drift(files)
                for p in problems:
                    print(p, file=sys.stderr)
                if problems:
                    print("k8s/ drifted: run `python -m cluster render --k8s`", file=sys.stderr)
                return 1 if problems else 0
            write_tree(files)
            print(f"wrote {len(files)} files under k8s/")
            return 0
        if args.cloud is None:
            print("render: give --cloud (or --k8s)", file=sys.stderr)
            return 2
        rendered = render_rayservice(load_config(config_path), args.cloud)
    except RenderError as e:
        print(e, file=sys.stderr)
        return 1
    text = to_yaml(rendered.rayservice.dump())
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _fake(args: argparse.Namespace) -> int:
    from .fake_cluster import fake_cluster_yaml
    from .render import PROD_CONFIG, load_config

    text = fake_cluster_yaml(load_config(args.config or PROD_CONFIG), args.cloud, args.gcs_address)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .render import PROD_CONFIG, load_config, preflight

    config = load_config(args.config or PROD_CONFIG)
    status = 0
    for cloud in CLOUDS:
        groups, findings = preflight(config, cloud)
        for g in groups:
            print(g.explain())
        for f in errors(findings):
            print(f, file=sys.stderr)
            status = 1
    return status


def _capacity(args: argparse.Namespace) -> int:
    from .capacity import live_nodes, unplaceable
    from .render import PROD_CONFIG, load_config
    from .serve_config import resolve_deployments

    path = args.config or PROD_CONFIG
    deployments = resolve_deployments(load_config(path)).deployments
    problems = unplaceable(deployments, live_nodes(args.address))
    for f in problems:
        print(f"{path}: {f}", file=sys.stderr)
    if not problems:
        print(f"{path}: every deployment fits on a node of the cluster")
    return 1 if problems else 0


def _cost(args: argparse.Namespace) -> int:
    from .cost import (
        Comparison,
        TargetResult,
        break_even,
        format_report,
        kuberay_cluster,
        modal_classes,
        recommendation,
        serve_deployments,
        simulate_kuberay,
        simulate_modal,
    )
    from .cost_inputs import (
        ROUTES,
        CostInputError,
        Trace,
        builtin_trace,
        load_prices,
        load_trace_csv,
        parse_mix,
        parse_seconds,
    )
    from .pools import POOLS, UnpinnedError
    from .render import PROD_CONFIG, RenderError, load_config

    try:
        service_s = parse_seconds(args.service_time, "--service-time", positive=True)
        replica_start_s = parse_seconds(args.replica_start, "--replica-start")
        node_start_s = parse_seconds(args.node_start, "--node-start", [p.name for p in POOLS])
        if args.idle_timeout is not None and not args.idle_timeout >= 0:
            raise CostInputError("--idle-timeout: give seconds (>= 0)")
        prices = load_prices(args.prices).with_node_discount(args.node_discount)
        config = load_config(args.config or PROD_CONFIG)
        deployments = serve_deployments(config, service_s, replica_start_s)
        names = [d.name for d in deployments]
        for flag, given in (("--service-time", service_s), ("--replica-start", replica_start_s)):
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise CostInputError(f"{flag}: no deployment {unknown}; deployments: {names}")
        if args.trace:
            trace = load_trace_csv(args.trace, [*ROUTES, *names])
        else:
            trace = builtin_trace(args.shape, args.rps, parse_mix(args.mix) if args.mix else None)
        classes = modal_classes(config, service_s)
        clouds = args.cloud or list(CLOUDS)
        groups = {
            cloud: kuberay_cluster(config, cloud, args.idle_timeout, node_start_s)
            for cloud in clouds
        }

        def simulate(t: Trace) -> list[TargetResult]:
            results = [simulate_kuberay(deployments, groups[c], t, prices) for c in clouds]
            return [*results, simulate_modal(classes, t, prices)]

        cmp = Comparison(trace, simulate(trace))
    except (CostInputError, RenderError, UnpinnedError) as e:
        print(f"cost: {e}", file=sys.stderr)
        return 2
    print(
        f"prices: {args.prices or 'cluster/prices.yaml'} (list prices of {prices.date}"
        + (f", nodes {args.node_discount:.0%} off)" if args.node_discount else ")")
    )
    print(format_report(cmp))
    targets = [r.target for r in cmp.results if r.target != "modal"]
    be = {} if args.no_break_even else break_even(simulate, trace, targets)
    for target, rps in be.items():
        where = f"{rps:.3g} req/s" if rps is not None else "none in x1/16..x256 of this trace"
        print(f"break-even {target} vs modal: {where}")
    print(recommendation(cmp, be))
    if args.plot:
        from .cost_plot import plot

        plot(cmp, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
