"""What the linter (and the renderer's pre-flight) reports: path, reason, suggestion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    path: str  # where in the Serve config, e.g. applications[0].deployments[1].num_gpu
    reason: str
    suggestion: str | None = None

    def __str__(self) -> str:
        text = f"{self.severity}: {self.path or '<root>'}: {self.reason}"
        return text + (f"\n    suggestion: {self.suggestion}" if self.suggestion else "")


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def join_path(base: str, *parts: str | int) -> str:
    out = base
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else part
    return out
