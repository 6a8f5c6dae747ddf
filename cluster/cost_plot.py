"""The cost model's picture: replicas/containers, nodes and spend over the trace (PNG).

matplotlib is the ``cost`` extra (``pip install -e '.[cost]'``), imported here only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cost import Comparison


def plot(cmp: Comparison, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(
            "the plot needs matplotlib: pip install -e '.[cost]' (or leave out --plot)"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [t / 3600 for t in range(cmp.trace.duration_s)]
    fig, axes = plt.subplots(len(cmp.results) + 1, 1, figsize=(11, 3 * (len(cmp.results) + 1)))
    axes_list: list[Any] = list(axes)
    load = [0] * cmp.trace.duration_s
    for counts in cmp.trace.arrivals.values():
        for t, c in enumerate(counts):
            load[t] += c
    axes_list[0].plot(hours, load, lw=0.6, color="gray")
    axes_list[0].set_ylabel("requests/s")
    axes_list[0].set_title(cmp.trace.name)
    for ax, r in zip(axes_list[1:], cmp.results, strict=True):
        for line in r.lines:
            if line.timeline:
                ax.step(hours, line.timeline, where="post", lw=0.9, label=line.name)
        for pool, counts in r.nodes.items():
            ax.step(hours, counts, where="post", lw=1.4, ls="--", label=f"{pool} nodes")
        ax.set_ylabel("replicas / nodes")
        ax.set_title(f"{r.target}: ${r.per_day:,.0f}/day, idle {r.idle_share:.0%}")
        ax.legend(fontsize=7, ncol=4, loc="upper right")
        spend = ax.twinx()
        spend.plot(hours, [c * 3600 for c in r.cost_timeline], color="black", lw=0.8)
        spend.set_ylabel("USD/hour")
    axes_list[-1].set_xlabel("hours into the trace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
