"""The lane-vs-simulator comparison (cluster.sim_check): timelines from samples, the
timings measured from them, and the error metrics, on hand-made samples."""

from __future__ import annotations

import pytest

from cluster.sim_check import calibrate, compare, compare_series, lane_timelines, per_second


def sample(t, replicas, pools=None, nodes=None):
    """One observer sample: replicas as {deployment: [(id, state, node), ...]}."""
    return {
        "t": t,
        "pools": pools or {},
        "nodes": nodes or {},
        "deployments": {
            name: {"replicas": [{"id": i, "state": s, "node": n} for i, s, n in reps]}
            for name, reps in replicas.items()
        },
    }


def test_per_second_holds_the_last_sample_and_skips_errors():
    samples = [
        {"t": 100.4, "v": 1},
        {"t": 101.0, "error": "slow dashboard"},
        {"t": 102.5, "v": 3},
        {"t": 104.0, "v": 2},
    ]
    # before the first sample: the first; then the last at or before each second
    assert per_second(samples, 100.0, 6, lambda s: s["v"]) == [1, 1, 1, 3, 2, 2]
    with pytest.raises(ValueError):
        per_second([{"t": 1.0, "error": "x"}], 0.0, 3, lambda s: 0)


def test_lane_timelines_count_active_replicas_and_pool_nodes():
    samples = [
        sample(0.0, {"LLM": [("a", "RUNNING", "n1")]}, {"gpu": 1}),
        sample(1.0, {"LLM": [("a", "RUNNING", "n1"), ("b", "STARTING", None)]}, {"gpu": 1}),
        sample(2.0, {"LLM": [("a", "RUNNING", "n1"), ("b", "RUNNING", "n2")]}, {"gpu": 2}),
        sample(3.0, {"LLM": [("a", "RUNNING", "n1"), ("b", "STOPPING", "n2")]}, {"gpu": 2}),
    ]
    replicas, nodes = lane_timelines(samples, 0.0, 5, ["LLM", "SAM"], ["gpu", "cpu"])
    assert replicas == {"LLM": [1, 2, 2, 1, 1], "SAM": [0, 0, 0, 0, 0]}
    assert nodes == {"gpu": [1, 1, 2, 2, 2], "cpu": [0, 0, 0, 0, 0]}


def test_calibrate_measures_service_replica_and_node_start():
    samples = [
        sample(10.0, {"LLM": [("a", "RUNNING", "n1")]}, nodes={"n1": "gpu"}),
        # b pending at 12 (no node), its node n2 appears at 15, b runs at 21
        sample(
            12.0, {"LLM": [("a", "RUNNING", "n1"), ("b", "STARTING", None)]}, nodes={"n1": "gpu"}
        ),
        sample(
            15.0,
            {"LLM": [("a", "RUNNING", "n1"), ("b", "STARTING", "n2")]},
            nodes={"n1": "gpu", "n2": "gpu"},
        ),
        sample(
            21.0,
            {"LLM": [("a", "RUNNING", "n1"), ("b", "RUNNING", "n2")], "SAM": []},
            nodes={"n1": "gpu", "n2": "gpu"},
        ),
    ]
    results = [
        {"deployment": "LLM", "t0": 0.0, "t1": 2.0, "status": 200},
        {"deployment": "LLM", "t0": 0.0, "t1": 4.0, "status": 200},
        {"deployment": "Codegen", "t0": 0.0, "t1": 9.0, "status": 200},
        {"deployment": "LLM", "t0": 0.0, "t1": 50.0, "status": 503},  # not counted
    ]
    got = calibrate(samples, results, {"LLM": {"a"}, "SAM": set()})
    assert got["service_s"] == {"LLM": 3.0, "Codegen": 9.0, "Ingress": 5.0}
    # from the later of (replica seen 12, node seen 15) to RUNNING at 21
    assert got["replica_start_s"] == {"LLM": 6.0, "SAM": 6.0}
    # from the replica placed on it first seen (12) to the node seen (15)
    assert got["node_start_s"] == {"gpu": 3.0}


def test_compare_series_metrics():
    real = [1, 1, 2, 2, 2, 2, 1, 1]
    sim = [1, 1, 1, 2, 2, 2, 2, 1]
    r = compare_series(real, sim, load_end_s=5)
    assert r["real_unit_s"] == 12 and r["sim_unit_s"] == 12 and r["rel_err"] == 0.0
    assert r["mae"] == pytest.approx(2 / 8)
    assert r["up_s"] == [2, 3] and r["up_diff_s"] == 1
    assert r["back_s"] == [6, 7]
    assert r["peak"] == [2, 2] and r["start"] == [1, 1]
    flat = compare_series([1, 1, 1], [1, 2, 1], load_end_s=2)
    assert flat["up_s"] == [None, 1] and flat["up_diff_s"] is None
    assert flat["back_s"] == [None, 2]
    assert flat["rel_err"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        compare_series([1, 2], [1], 1)


def test_compare_totals():
    check = compare(
        {"LLM": [1, 2, 2, 1], "SAM": [1, 1, 1, 1]},
        {"LLM": [1, 1, 2, 2], "SAM": [1, 1, 1, 1]},
        {"gpu": [1, 2, 2, 2]},
        {"gpu": [1, 1, 2, 3]},
        load_end_s=2,
    )
    assert check["replicas_total"] == {
        "real_unit_s": 10,
        "sim_unit_s": 10,
        "rel_err": 0.0,
        "mean_mae": pytest.approx((2 / 4 + 0) / 2),
    }
    assert check["nodes_total"]["rel_err"] == pytest.approx((7 - 7) / 7)
    assert check["pools"]["gpu"]["mae"] == pytest.approx(2 / 4)


def test_replica_durations_from_the_access_logs(tmp_path):
    from datetime import datetime

    from cluster.simulate import replica_durations

    serve = tmp_path / "serve"
    serve.mkdir()
    (serve / "replica_app_LLM_abc.log").write_text(
        "INFO 2026-12-02 15:58:27,173 app_LLM abc r1 -- CALL invoke OK 23.1ms\n"
        "INFO 2026-12-02 15:58:29,000 app_LLM abc r2 -- CALL invoke ERROR 1500ms\n"
        "INFO 2026-12-02 15:58:29,500 app_LLM abc -- Started replica\n"
        "INFO 2026-12-02 15:58:20,000 app_LLM abc r0 -- CALL invoke OK 9.0ms\n"  # before
    )
    (serve / "replica_app_Codegen_x.log").write_text(
        "INFO 2026-12-02 15:58:28,000 app_Codegen x r3 -- CALL invoke OK 7.0ms\n"
    )
    since = datetime(2026, 12, 2, 15, 58, 25).timestamp()
    assert replica_durations(tmp_path, "app", "LLM", since) == pytest.approx([0.0231, 1.5])


def test_calibrate_prefers_the_replicas_own_durations():
    samples = [sample(0.0, {"LLM": [("a", "RUNNING", "n1")]})]
    results = [{"deployment": "LLM", "t0": 0.0, "t1": 80.0, "status": 200}]
    got = calibrate(samples, results, {"LLM": {"a"}}, {"LLM": [10.0, 20.0], "SAM": []})
    # queueing in front of the replica is not a slot held: the replica's 15 s, not 80 s
    assert got["service_s"] == {"LLM": 15.0, "Ingress": 80.0}
    assert got["replica_start_s"] == {} and got["node_start_s"] == {}
