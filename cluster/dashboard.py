"""The Grafana dashboard of ``k8s/monitoring/``, made from :mod:`serve_apps.metrics`.

One panel per metric definition, so a metric added there gets a panel here at the next
``python -m cluster render --k8s`` (and the drift test fails until it is rendered). The
queries use the names Ray's exporter gives them on KubeRay: a ``ray_`` prefix, and
``_total`` on counters (on Modal and in-process ``/metrics`` the names have no prefix).
"""

from __future__ import annotations

from typing import Any

from serve_apps.metrics import METRICS, Metric

PREFIX = "ray_"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def queries(m: Metric) -> list[tuple[str, str]]:
    """(PromQL, legend) for one metric's panel."""
    name = PREFIX + m.name
    by = ", ".join(m.labels)
    legend = " ".join("{{" + label + "}}" for label in m.labels) or m.name
    if m.kind == "counter":
        return [
            (
                f"sum by ({by}) (rate({name}_total[5m]))" if by else f"sum(rate({name}_total[5m]))",
                legend,
            )
        ]
    if m.kind == "gauge":
        return [(f"sum by ({by}) ({name})" if by else f"sum({name})", legend)]
    grouping = ", ".join(["le", *m.labels])
    return [
        (
            f"histogram_quantile({q}, sum by ({grouping}) (rate({name}_bucket[5m])))",
            f"p{int(q * 100)} {legend}",
        )
        for q in (0.5, 0.99)
    ]


def panel(m: Metric, index: int) -> dict[str, Any]:
    unit = "s" if m.name.endswith("_seconds") else ("reqps" if m.kind == "counter" else "short")
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": m.name.removeprefix("serve_apps_").replace("_", " "),
        "description": m.help,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(queries(m))
        ],
    }


def dashboard() -> dict[str, Any]:
    return {
        "title": "serve-apps",
        "uid": "serve-apps",
        "tags": ["serve-apps", "ray-serve"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                }
            ]
        },
        "panels": [panel(m, i) for i, m in enumerate(METRICS)],
    }
