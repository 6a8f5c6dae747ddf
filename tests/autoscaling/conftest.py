"""The autoscaling lane is opt-in (minutes, and a multi-node Ray cluster on this box):
`scripts/test-autoscaling`, i.e. `pytest -m autoscaling tests/autoscaling`. Without that
marker expression its tests are reported as skipped, with this reason."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    expr = config.getoption("markexpr") or ""
    if "autoscaling" in expr and "not autoscaling" not in expr:
        return
    skip = pytest.mark.skip(
        reason="opt-in lane: run scripts/test-autoscaling (pytest -m autoscaling)"
    )
    for item in items:
        if item.get_closest_marker("autoscaling"):
            item.add_marker(skip)
