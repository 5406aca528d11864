"""`/metrics` in Prometheus' text exposition format (counters kept per app, no global registry)."""

from __future__ import annotations

import collections
from typing import Any

PREFIX = "snn_serve"
ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


class Metrics:
    """Request counts by route and status, token totals, latency sum/count, live queue gauges."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency_sum = 0.0
        self.latency_count = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def observe(self, path: str, status: int, latency: float, info: dict[str, Any]) -> None:
        self.requests[(path if path in ROUTES else "other", int(status))] += 1  # bounded label set
        if not info:
            return
        self.prompt_tokens += int(info.get("prompt_tokens") or 0)
        self.completion_tokens += int(info.get("completion_tokens") or 0)
        self.latency_sum += latency
        self.latency_count += 1
        if info.get("ttft") is not None:
            self.ttft_sum += float(info["ttft"])
            self.ttft_count += 1

    def render(self) -> str:
        lines = [f"# HELP {PREFIX}_requests_total HTTP requests by route and status.",
                 f"# TYPE {PREFIX}_requests_total counter"]  # fmt: skip
        for (path, status), n in sorted(self.requests.items()):
            lines.append(f'{PREFIX}_requests_total{{route="{_escape(path)}",status="{status}"}} {n}')
        rows = [
            ("prompt_tokens_total", "counter", "Prompt tokens of completed generations.", self.prompt_tokens),
            ("completion_tokens_total", "counter", "Generated tokens.", self.completion_tokens),
            ("generation_seconds_sum", "counter", "Wall time of generations (seconds).", self.latency_sum),
            ("generation_seconds_count", "counter", "Generations finished.", self.latency_count),
            ("time_to_first_token_seconds_sum", "counter", "Time to first token (seconds).", self.ttft_sum),
            ("time_to_first_token_seconds_count", "counter", "Generations with a first token.", self.ttft_count),
            ("active_requests", "gauge", "Requests decoding now.", self.engine.active),
            ("queued_requests", "gauge", "Requests waiting for a decode slot.", self.engine.waiting),
        ]
        for name, kind, doc, value in rows:
            lines += [f"# HELP {PREFIX}_{name} {doc}", f"# TYPE {PREFIX}_{name} {kind}", f"{PREFIX}_{name} {value}"]
        return "\n".join(lines) + "\n"


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
