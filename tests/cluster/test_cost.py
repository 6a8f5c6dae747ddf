"""The cost model (cluster.cost, cluster.cost_inputs): hand-computed cases, each target's
policy rules, and the parsing of traces and price tables."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cluster.cost import (
    KubeRayCluster,
    ModalClass,
    ServeAutoscaler,
    ServeDeployment,
    break_even,
    percentile,
    simulate_kuberay,
    simulate_modal,
)
from cluster.cost_inputs import (
    PRICES_FILE,
    CostInputError,
    Prices,
    Trace,
    builtin_trace,
    load_prices,
    parse_mix,
    parse_prices,
    parse_trace_csv,
)
from cluster.pools import A100_40GB, A100_80GB, CPU

# Round prices, so every expected dollar figure below is seconds x price by hand.
PRICES = Prices(
    date="2026-01-01",
    sources={"modal": "test", "gke": "test", "eks": "test"},
    modal_gpu={"A100-80GB": 0.001, "A100-40GB": 0.0005, "H100": 0.002},
    modal_cpu_core=0.00001,
    modal_memory_gib=0.000001,
    nodes={
        "gke": {"a2-ultragpu-1g": 0.001, "a2-highgpu-1g": 0.0008, "n2-standard-8": 0.0001},
        "eks": {"p4de.24xlarge": 0.008, "p4d.24xlarge": 0.006, "m6i.2xlarge": 0.0001},
    },
    cluster={"gke": 0.0, "eks": 0.0},
)


def one_request(route: str, duration_s: int, at: int = 0, count: int = 1) -> Trace:
    counts = [0] * duration_s
    counts[at] = count
    return Trace("test", duration_s, {route: counts})


def modal_class(**kw) -> ModalClass:
    base = dict(
        name="LLM",
        services={"LLM": 5.0},
        gpu="A100-80GB",
        gpu_count=1,
        cpu=0.0,
        memory_gib=0.0,
        min_containers=0,
        max_containers=1,
        scaledown_window=60.0,
        max_inputs=1,
        target_inputs=None,
        cold_start_s=10.0,
    )
    base.update(kw)
    return ModalClass(**base)  # type: ignore[arg-type]


def llm_deployment(**kw) -> ServeDeployment:
    base = dict(
        name="LLM",
        pool=A100_80GB,
        resources={"GPU": 1.0, "CPU": 4.0},
        min_replicas=0,
        max_replicas=1,
        initial_replicas=0,
        target_ongoing_requests=1.0,
        max_ongoing_requests=1,
        look_back_s=10.0,
        upscale_delay_s=30.0,
        downscale_delay_s=20.0,
        downscale_to_zero_delay_s=None,
        service_s=5.0,
        replica_start_s=10.0,
    )
    base.update(kw)
    return ServeDeployment(**base)  # type: ignore[arg-type]


def gke_cluster(**kw) -> KubeRayCluster:
    base = dict(
        cloud="gke",
        min_nodes={"a100-80gb": 0},
        max_nodes={"a100-80gb": 1},
        idle_timeout_s=30.0,
        node_start_s={"a100-80gb": 50.0},
        head_instance=None,
    )
    base.update(kw)
    return KubeRayCluster(**base)  # type: ignore[arg-type]


# --- hand-computed: one replica, one request -------------------------------------------


def test_modal_one_request_from_zero():
    # t=0 the request arrives, a container starts (cold start 10 s) and serves it at t=10
    # for 5 s; idle from t=15, it stops 60 s later (t=75): 75 container-seconds paid.
    r = simulate_modal([modal_class()], one_request("LLM", 200), PRICES)
    line = r.lines[0]
    assert line.timeline[:75] == [1] * 75 and line.timeline[75:] == [0] * 125
    assert line.cost == pytest.approx(75 * 0.001)
    assert line.idle_cost == pytest.approx(70 * 0.001)  # 10 s starting + 60 s window
    assert line.waits == [(10, 1)]
    assert r.per_day == pytest.approx(75 * 0.001 * 86400 / 200)
    assert r.per_1k(1) == pytest.approx(75.0)


def test_kuberay_one_request_from_zero():
    # t=0: the request waits at zero -> one replica at once; no node: a node is requested
    # (up at t=50), the replica serves from t=60 (10 s load); done at t=65. The look-back
    # (10 s) empties at t=74, the downscale delay (20 s) ends at t=93: the replica goes.
    # The node is idle from t=93 and removed at t=123 (idle timeout 30 s): 123 s paid.
    r = simulate_kuberay([llm_deployment()], gke_cluster(), one_request("LLM", 300), PRICES)
    llm, spare, overhead = r.lines
    assert llm.timeline[:93] == [1] * 93 and llm.timeline[93:] == [0] * 207
    assert r.nodes["a100-80gb"][:123] == [1] * 123 and r.nodes["a100-80gb"][123:] == [0] * 177
    assert r.cost == pytest.approx(123 * 0.001)
    assert llm.cost == pytest.approx(93 * 0.001)
    assert llm.idle_cost == pytest.approx(88 * 0.001)  # 93 s held, 5 s serving
    assert spare.cost == pytest.approx(30 * 0.001)  # the node's idle timeout
    assert overhead.cost == 0
    assert llm.waits == [(60, 1)]
    assert r.idle_share == pytest.approx(118 / 123)


def test_kuberay_head_and_control_plane_are_paid_all_along():
    prices = Prices(**{**PRICES.__dict__, "cluster": {"gke": 0.00003, "eks": 0.0}})
    cluster = gke_cluster(head_instance="n2-standard-8")
    r = simulate_kuberay(
        [llm_deployment()], cluster, Trace("idle", 100, {"LLM": [0] * 100}), prices
    )
    assert r.lines[-1].cost == pytest.approx(100 * (0.0001 + 0.00003))
    assert r.cost == pytest.approx(100 * (0.0001 + 0.00003))  # no node: min 0, no load


# --- Ray Serve's policy -------------------------------------------------------------------


def scaler(**kw) -> ServeAutoscaler:
    base = dict(
        min_replicas=1,
        max_replicas=3,
        initial_replicas=1,
        target_ongoing_requests=2.0,
        look_back_s=1.0,
        upscale_delay_s=3.0,
        downscale_delay_s=5.0,
    )
    base.update(kw)
    return ServeAutoscaler(llm_deployment(**base))


def test_serve_upscale_after_the_delay_and_a_reset_restarts_it():
    s = scaler()
    assert [s.tick(5) for _ in range(3)] == [1, 1, 3]  # ceil(5/2)=3 wanted for 3 s
    s = scaler()
    assert [s.tick(5), s.tick(5), s.tick(2), s.tick(5), s.tick(5)] == [1, 1, 1, 1, 1]


def test_serve_downscale_after_its_own_delay():
    s = scaler(initial_replicas=3)
    assert [s.tick(0) for _ in range(5)] == [3, 3, 3, 3, 1]


def test_serve_scale_to_zero_uses_its_delay_and_scales_from_zero_at_once():
    s = scaler(min_replicas=0, initial_replicas=1, downscale_to_zero_delay_s=7.0)
    assert [s.tick(0) for _ in range(7)] == [1] * 6 + [0]
    assert s.tick(1) == 1  # a request waiting at zero: no upscale delay


def test_serve_averages_over_the_look_back():
    s = scaler(look_back_s=4.0, upscale_delay_s=0.0)
    assert [s.tick(8), s.tick(0), s.tick(0), s.tick(0)] == [3, 3, 3, 3]
    # samples [8,0,0,0]: mean 2 -> ceil(2/2) = 1 wanted, but 1 s < the downscale delay
    assert s.desired() == 1
    assert s.tick(0) == 3 and s.desired() == 1


def test_serve_bounds():
    s = scaler(upscale_delay_s=0.0)
    assert s.tick(100) == 3  # max_replicas
    s = scaler(downscale_delay_s=1.0)
    assert s.tick(0) == 1  # min_replicas


# --- KubeRay's nodes ----------------------------------------------------------------------


def test_two_half_gpu_replicas_share_a_node_a_third_needs_another():
    det = llm_deployment(
        name="Detector",
        pool=A100_40GB,
        resources={"GPU": 0.5, "CPU": 2.0},
        min_replicas=1,
        max_replicas=2,
        initial_replicas=1,
    )
    sam = llm_deployment(
        name="SAM",
        pool=A100_40GB,
        resources={"GPU": 0.5, "CPU": 2.0},
        min_replicas=1,
        max_replicas=1,
        initial_replicas=1,
    )
    cluster = gke_cluster(
        min_nodes={"a100-40gb": 1},
        max_nodes={"a100-40gb": 2},
        node_start_s={"a100-40gb": 50.0},
    )
    idle = Trace("idle", 10, {"SAM": [0] * 10})
    r = simulate_kuberay([det, sam], cluster, idle, PRICES)
    assert r.nodes["a100-40gb"] == [1] * 10
    assert r.cost == pytest.approx(10 * 0.0008)
    # Each holds half the node: half the price each, nothing unused.
    assert r.lines[0].cost == pytest.approx(10 * 0.0004)
    assert r.lines[1].cost == pytest.approx(10 * 0.0004)
    assert r.lines[2].cost == pytest.approx(0)
    # Three Detector requests at once: a 2nd Detector replica, which needs a 2nd node.
    busy = Trace("busy", 40, {"Detector": [3] + [0] * 39})
    det2 = llm_deployment(**{**det.__dict__, "upscale_delay_s": 0.0, "service_s": 30.0})
    r = simulate_kuberay([det2, sam], cluster, busy, PRICES)
    assert r.nodes["a100-40gb"][0] == 2
    assert r.lines[0].timeline[0] == 2


def test_min_nodes_stay_up_empty():
    cluster = gke_cluster(min_nodes={"a100-80gb": 1})
    r = simulate_kuberay([llm_deployment()], cluster, Trace("idle", 50, {"LLM": [0] * 50}), PRICES)
    assert r.nodes["a100-80gb"] == [1] * 50
    assert r.cost == pytest.approx(50 * 0.001)
    assert r.idle_share == 1.0


def test_eks_node_is_eight_gpus():
    # One 1-GPU replica on EKS pays for a whole p4de.24xlarge: 1/8 to the replica.
    dep = llm_deployment(min_replicas=1, initial_replicas=1)
    cluster = gke_cluster(cloud="eks", min_nodes={"a100-80gb": 1})
    r = simulate_kuberay([dep], cluster, Trace("idle", 10, {"LLM": [0] * 10}), PRICES)
    assert r.cost == pytest.approx(10 * 0.008)
    assert r.lines[0].cost == pytest.approx(10 * 0.001)
    assert r.lines[1].cost == pytest.approx(10 * 0.007)


# --- Modal's policy ----------------------------------------------------------------------


def test_modal_min_containers_are_paid_all_along():
    c = modal_class(min_containers=1, cpu=2.0, memory_gib=10.0)
    r = simulate_modal([c], Trace("idle", 100, {"LLM": [0] * 100}), PRICES)
    per_s = 0.001 + 2 * 0.00001 + 10 * 0.000001
    assert r.cost == pytest.approx(100 * per_s)
    assert r.idle_share == 1.0
    assert r.lines[0].timeline == [1] * 100


def test_modal_target_inputs_sets_the_container_count():
    c = modal_class(max_containers=5, max_inputs=8, target_inputs=4, cold_start_s=0.0)
    r = simulate_modal([c], one_request("LLM", 5, count=10), PRICES)
    assert r.lines[0].timeline[0] == 3  # ceil(10 / 4)


def test_modal_inputs_fill_the_oldest_containers_and_the_rest_scale_down():
    # Two requests at t=0 start two containers (no cold start: serving from the next tick,
    # t=1..5, both idle from t=6). A request at t=10 goes to the oldest container (busy
    # t=10..14, idle from t=15); the newer one stops at 6+20=26, the older at 15+20=35.
    c = modal_class(max_containers=2, scaledown_window=20.0, cold_start_s=0.0)
    counts = [0] * 100
    counts[0], counts[10] = 2, 1
    res = simulate_modal([c], Trace("two", 100, {"LLM": counts}), PRICES)
    assert res.lines[0].timeline == [2] * 26 + [1] * 9 + [0] * 65
    assert res.lines[0].waits == [(1, 2), (0, 1)]


def test_modal_packed_class_hosts_two_services_on_one_container():
    c = modal_class(name="Vision", services={"Detector": 3.0, "SAM": 1.0}, max_inputs=2)
    trace = Trace("v", 200, {"detect": [1] + [0] * 199, "segment": [1] + [0] * 199})
    r = simulate_modal([c], trace, PRICES)
    assert r.lines[0].requests == 2
    assert max(r.lines[0].timeline) == 1
    # started at 0, ready at 10, both served at once, last done at 13, stops at 73
    assert r.lines[0].cost == pytest.approx(73 * 0.001)


# --- break-even, percentile ---------------------------------------------------------------


def test_break_even_interpolates_the_crossing():
    from cluster.cost import TargetResult

    def fake(trace: Trace) -> list[TargetResult]:
        # KubeRay: flat $100; Modal: $10 per (mean req/s): equal at 10 req/s.
        class R:
            def __init__(self, target: str, cost: float):
                self.target, self.cost = target, cost

        return [R("kuberay-gke", 100.0), R("modal", 10.0 * trace.mean_rps)]  # type: ignore[list-item]

    trace = builtin_trace("steady", 1.0, {"chat": 1.0}, duration_s=64)
    assert break_even(fake, trace, ["kuberay-gke"]) == {"kuberay-gke": pytest.approx(10.0)}


def test_percentile_is_weighted():
    assert percentile([(0, 94), (10, 6)], 0.95) == 10
    assert percentile([(0, 95), (10, 5)], 0.95) == 0
    assert percentile([], 0.95) == 0


# --- traces ------------------------------------------------------------------------------


def test_csv_trace_bins_by_second_relative_to_the_first_row():
    t = parse_trace_csv(
        "timestamp,route,count\n100.5,chat,2\n100,chat,1\n103,generate,4\n", duration_s=10
    )
    assert t.arrivals["chat"] == [3] + [0] * 9
    assert t.arrivals["generate"] == [0, 0, 0, 4] + [0] * 6
    assert t.total == 7 and t.duration_s == 10


def test_csv_trace_iso_timestamps():
    t = parse_trace_csv(
        "timestamp,route,count\n2026-01-01T00:00:00Z,chat,1\n2026-01-01T00:01:00Z,chat,1\n"
    )
    assert t.duration_s == 61 and t.arrivals["chat"][60] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "line 1: the header must be timestamp,route,count"),
        ("time,route,count\n0,chat,1\n", "line 1: the header"),
        ("timestamp,route,count\n", "no rows after the header"),
        ("timestamp,route,count\n0,chat\n", "line 2: 3 fields"),
        ("timestamp,route,count\nnoon,chat,1\n", "line 2: timestamp 'noon' is neither"),
        (
            "timestamp,route,count\n0,chta,1\n",
            "line 2: unknown route 'chta' (did you mean 'chat'?)",
        ),
        ("timestamp,route,count\n0,chat,1\n1,chat,-2\n", "line 3: count -2 is negative"),
        ("timestamp,route,count\n0,chat,1.5\n", "line 2: count '1.5' is not a whole number"),
        ("timestamp,route,count\n0,chat,1\nnan,chat,1\n", "line 3: timestamp 'nan' is not finite"),
    ],
)
def test_csv_trace_errors(text: str, message: str):
    with pytest.raises(CostInputError, match=None) as e:
        parse_trace_csv(text, name="t.csv")
    assert message in str(e.value)
    assert str(e.value).startswith("t.csv: ")


def test_csv_trace_past_its_duration():
    with pytest.raises(CostInputError, match="rows reach second 5, past duration 5"):
        parse_trace_csv("timestamp,route,count\n0,chat,1\n5,chat,1\n", duration_s=5)


@pytest.mark.parametrize("shape", ["steady", "diurnal", "bursty", "nightly-batch"])
def test_builtin_shapes_keep_the_mean_and_the_mix(shape: str):
    t = builtin_trace(shape, 2.0, {"chat": 3, "generate": 1})
    assert t.duration_s == 86400
    assert t.total == pytest.approx(2.0 * 86400, abs=2)
    assert sum(t.arrivals["chat"]) == pytest.approx(1.5 * 86400, abs=1)


def test_builtin_shapes_have_their_shape():
    hour = 3600
    diurnal = builtin_trace("diurnal", 10.0, {"chat": 1})
    peak, trough = diurnal.arrivals["chat"][15 * hour], diurnal.arrivals["chat"][3 * hour]
    assert peak == 19 and trough in (0, 1)
    batch = builtin_trace("nightly-batch", 1.0, {"chat": 1})
    assert sum(batch.arrivals["chat"][2 * hour : 3 * hour]) == 86400
    bursty = builtin_trace("bursty", 1.0, {"chat": 1})
    in_bursts = sum(
        sum(bursty.arrivals["chat"][b * 4 * hour : b * 4 * hour + 900]) for b in range(6)
    )
    assert in_bursts == pytest.approx(0.8 * 86400, abs=6)


def test_builtin_trace_errors():
    with pytest.raises(CostInputError, match="unknown trace shape 'weekly'"):
        builtin_trace("weekly", 1.0)
    with pytest.raises(CostInputError, match="mean rate is a number > 0"):
        builtin_trace("steady", 0)
    with pytest.raises(CostInputError, match="--mix: 'chat' is not route=weight"):
        parse_mix("chat")
    with pytest.raises(CostInputError, match="not route=weight"):
        parse_mix("chat=-1")


def test_scaled_trace_keeps_whole_requests():
    t = Trace("t", 4, {"chat": [1, 1, 1, 1]})
    assert t.scaled(0.5).arrivals["chat"] == [0, 1, 0, 1]
    assert t.scaled(2.5).total == 10


# --- prices ------------------------------------------------------------------------------


def test_the_price_table_covers_every_pool():
    p = load_prices()
    assert p.date and p.sources["modal"].startswith("https://")
    assert p.node("gke", "a2-ultragpu-1g") * 3600 == pytest.approx(5.0688, abs=1e-3)
    assert p.modal_gpu["A100-80GB"] * 3600 == pytest.approx(2.5, abs=0.01)


def _prices_text(**replace: str) -> str:
    text = PRICES_FILE.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('date: "2025-06-01"', "date: soon", "date: give the date"),
        ("    a2-highgpu-1g: 0.00102038", "", "nodes.gke.a2-highgpu-1g: missing (the a100-40gb"),
        ("    H100: 0.001097", "", "modal.gpu.H100: missing (pool a100-80gb uses it"),
        (
            "m6i.2xlarge: 0.00010667",
            "m6i.2xlarge: -1",
            "nodes.eks.m6i.2xlarge: a price is a finite",
        ),
        ("cpu_core: 0.0000131", "cpu_core: cheap", "modal.cpu_core: a price is a number"),
        ("  modal: https://modal.com/pricing\n", "", "sources.modal: say where"),
        ("currency: USD", "currency: EUR", "currency: only USD"),
    ],
)
def test_price_table_errors(old: str, new: str, message: str):
    with pytest.raises(CostInputError) as e:
        parse_prices(_prices_text(**{old: new}), "p.yaml")
    assert message in str(e.value) and str(e.value).startswith("p.yaml: ")


def test_node_discount_changes_nodes_only():
    p = load_prices().with_node_discount(0.6)
    assert p.node("gke", "a2-ultragpu-1g") == pytest.approx(0.001408 * 0.4)
    assert p.modal_gpu == load_prices().modal_gpu
    with pytest.raises(CostInputError, match="--node-discount: a share in"):
        load_prices().with_node_discount(1.0)


def test_price_table_not_yaml_or_missing(tmp_path: Path):
    with pytest.raises(CostInputError, match="not YAML"):
        parse_prices("a: [", "p.yaml")
    with pytest.raises(CostInputError, match="cannot read the price table"):
        load_prices(tmp_path / "none.yaml")


def test_pools_in_the_test_prices_match_the_pools():
    for pool in (A100_80GB, A100_40GB, CPU):
        for cloud in ("gke", "eks"):
            assert pool.shape(cloud).instance_type in PRICES.nodes[cloud]
    assert not math.isnan(PRICES.node("gke", "n2-standard-8"))


# --- the command, on the production config --------------------------------------------------


def test_cost_command_on_the_production_config(tmp_path: Path, capsys):
    from cluster.__main__ import main

    trace = tmp_path / "t.csv"
    trace.write_text("timestamp,route,count\n0,chat,3\n100,generate,1\n1799,ground,2\n")
    png = tmp_path / "cost.png"
    assert main(["cost", "--trace", str(trace), "--no-break-even", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for target in ("kuberay-gke:", "kuberay-eks:", "modal:"):
        assert target in out
    assert "for this trace, " in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_command_errors(tmp_path: Path, capsys):
    from cluster.__main__ import main

    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,route,count\n0,chat,x\n")
    assert main(["cost", "--trace", str(bad)]) == 2
    assert "line 2: count 'x' is not a whole number" in capsys.readouterr().err
    assert main(["cost", "--service-time", "LMM=2"]) == 2
    assert "--service-time: no deployment ['LMM']" in capsys.readouterr().err
    assert main(["cost", "--service-time", "LLM"]) == 2
    assert "give NAME=SECONDS" in capsys.readouterr().err
    assert main(["cost", "--replica-start", "LLM=-1"]) == 2
    assert "--replica-start 'LLM=-1': give NAME=SECONDS (>= 0)" in capsys.readouterr().err
    assert main(["cost", "--node-start", "a100=5"]) == 2
    assert "--node-start: no 'a100'; one of: " in capsys.readouterr().err
    assert main(["cost", "--idle-timeout", "-3"]) == 2
    assert "--idle-timeout: give seconds" in capsys.readouterr().err


def test_measured_timings_replace_the_assumptions(prod_config):
    """What the lane check feeds the simulator: its Serve settings come from the config,
    the timings from arguments (no special case for the lane)."""
    from cluster.cost import ASSUMPTIONS, kuberay_cluster, serve_deployments

    fast = {**prod_config}
    app = {**fast["applications"][0]}
    app["deployments"] = [
        {**d, "autoscaling_config": {**d["autoscaling_config"], "upscale_delay_s": 1.0}}
        for d in app["deployments"]
    ]
    fast["applications"] = [app]
    by_name = {d.name: d for d in serve_deployments(fast, {"LLM": 2.5}, {"LLM": 7.0, "SAM": 0.0})}
    assert by_name["LLM"].service_s == 2.5 and by_name["LLM"].replica_start_s == 7.0
    assert by_name["SAM"].replica_start_s == 0.0
    assert by_name["Codegen"].service_s == ASSUMPTIONS["Codegen"].service_s
    assert by_name["LLM"].upscale_delay_s == 1.0
    default = kuberay_cluster(prod_config, "gke")
    fast_cluster = kuberay_cluster(prod_config, "gke", 6.0, {"a100-80gb": 4.0})
    assert fast_cluster.idle_timeout_s == 6.0 and default.idle_timeout_s == 300.0
    assert fast_cluster.node_start_s["a100-80gb"] == 4.0
    assert fast_cluster.node_start_s["cpu"] == default.node_start_s["cpu"]


def test_cost_command_refuses_a_config_without_pools(capsys):
    """config.yaml (the local default) pins no pool: a clear error, not a traceback."""
    from cluster.__main__ import main
    from cluster.render import REPO

    assert main(["cost", "--config", str(REPO / "config.yaml"), "--no-break-even"]) == 2
    assert "cost: CPU replica without a pool pin" in capsys.readouterr().err
