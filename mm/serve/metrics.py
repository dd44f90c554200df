"""The counters behind ``GET /metrics``, in Prometheus' text format (version 0.0.4), written here rather than
taken from ``prometheus_client``: four metric families do not need a dependency. Updated from the event loop's
thread only (the batcher and the request middleware), so no locks.

    mm_requests_total{endpoint, status}          requests answered
    mm_request_duration_seconds{endpoint}        latency histogram (receipt to the last byte of the answer)
    mm_requests_in_flight                        requests being handled now
    mm_batch_size{kind}                          items per model call (histogram)
    mm_queue_depth{kind}                         items waiting for the model (sampled at each scrape)
    mm_rejected_total{kind, reason}              items refused: queue full, timed out
"""
from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf only)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            total += n
            le = "+Inf" if bound == math.inf else _num(bound)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        out.append(f"{name}_sum{{{labels}}} {_num(self.sum)}" if labels else f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count{{{labels}}} {self.count}" if labels else f"{name}_count {self.count}")
        return out


def _num(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def _labels(**kv: str) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items())


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The server's counters; ``queue_depth`` is read from the batchers when scraped."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch: dict[str, Histogram] = {}
        self.rejected: dict[tuple[str, str], int] = defaultdict(int)
        self.in_flight = 0
        self.api_in_flight = 0  # of them, /v1/ requests (those that may bring items to a batcher)
        self.queue_depth: dict[str, Callable[[], int]] = {}
        self.started = time.time()

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] += 1
        self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch_size(self, kind: str, n: int) -> None:
        self.batch.setdefault(kind, Histogram(BATCH_BUCKETS)).observe(n)

    def reject(self, kind: str, reason: str, n: int = 1) -> None:
        self.rejected[kind, reason] += n

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_: str, rows: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *rows])

        family("mm_requests_total", "counter", "Requests answered, by endpoint and HTTP status.",
               [f"mm_requests_total{{{_labels(endpoint=e, status=str(s))}}} {n}"
                for (e, s), n in sorted(self.requests.items())])
        family("mm_request_duration_seconds", "histogram", "Request latency, receipt to answer.",
               [line for e, h in sorted(self.latency.items())
                for line in h.lines("mm_request_duration_seconds", _labels(endpoint=e))])
        family("mm_requests_in_flight", "gauge", "Requests being handled now.", [f"mm_requests_in_flight {self.in_flight}"])
        family("mm_batch_size", "histogram", "Items per model call, by kind.",
               [line for k, h in sorted(self.batch.items()) for line in h.lines("mm_batch_size", _labels(kind=k))])
        family("mm_queue_depth", "gauge", "Items waiting for the model, by kind.",
               [f"mm_queue_depth{{{_labels(kind=k)}}} {depth()}" for k, depth in sorted(self.queue_depth.items())])
        family("mm_rejected_total", "counter", "Items refused (queue full, timed out), by kind and reason.",
               [f"mm_rejected_total{{{_labels(kind=k, reason=r)}}} {n}" for (k, r), n in sorted(self.rejected.items())])
        family("mm_uptime_seconds", "gauge", "Seconds since the server started.",
               [f"mm_uptime_seconds {_num(round(time.time() - self.started, 3))}"])
        return "\n".join(out) + "\n"


def parse(text: str) -> dict[str, Any]:
    """{sample name with labels: value} of a Prometheus text page (tests and the benchmark read it)."""
    values: dict[str, Any] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
