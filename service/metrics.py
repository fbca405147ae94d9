"""Prometheus metrics of the server, served on their own port (--metrics-port; 0 = not served).

Each server gets its own CollectorRegistry, so several servers (tests) can live in one process.
Label children are bound once where the hot path would otherwise look them up per request.
"""
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

# Latencies from ~0.1 ms (a batched single name) to minutes (a million-name stream).
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300)
QUEUE_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def peak_rss_bytes():
    """The process's peak resident set size (VmHWM), 0 where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, ...
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "namegen_requests", "Finished RPCs by method and gRPC status code", ["method", "code"], registry=r
        )
        self.errors = Counter(
            "namegen_errors", "RPCs that ended with a status other than OK", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "namegen_request_latency_seconds", "RPC handling time in the server", ["method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "namegen_queue_time_seconds", "Time a request waited before its first model run",
            buckets=QUEUE_BUCKETS, registry=r,
        )
        self.batch_rows = Histogram("namegen_batch_rows", "Rows (names drawn) per model run", buckets=ROW_BUCKETS, registry=r)
        self.batch_requests = Histogram(
            "namegen_batch_requests", "Requests served together in one model run", buckets=REQUEST_BUCKETS, registry=r
        )
        self.run_time = Histogram(
            "namegen_model_run_seconds", "Wall time of one model run", buckets=LATENCY_BUCKETS, registry=r
        )
        self.names = Counter("namegen_names_generated", "Names returned to clients", registry=r)
        self.queue_depth = Gauge("namegen_queue_requests", "Requests queued or being served", registry=r)
        self.peak_rss = Gauge("namegen_process_peak_rss_bytes", "Peak resident set size (VmHWM)", registry=r)
        self.peak_rss.set_function(peak_rss_bytes)
        self._ok = {}  # method -> bound children, to keep the hot path to a few attribute lookups

    def serve(self, port, host="127.0.0.1"):
        """Serve /metrics over HTTP on host:port in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]

    def observe_rpc(self, method, code, seconds):
        """code: a grpc.StatusCode name ("OK", "INVALID_ARGUMENT", ...)."""
        key = (method, code)
        bound = self._ok.get(key)
        if bound is None:
            bound = self._ok[key] = (self.requests.labels(method, code), self.latency.labels(method))
        bound[0].inc()
        bound[1].observe(seconds)
        if code != "OK":
            self.errors.labels(method, code).inc()

    def observe_batch(self, rows, requests, seconds):
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.run_time.observe(seconds)


def rss_report():
    """One line with current and peak RSS, printed by the server when it exits."""
    cur = 0
    try:
        with open("/proc/self/statm") as f:
            cur = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    return f"rss {cur / 2**20:.1f} MiB, peak rss {peak_rss_bytes() / 2**20:.1f} MiB"
