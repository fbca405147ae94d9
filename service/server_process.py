"""A namegen server in a subprocess on 127.0.0.1 and an ephemeral port: started, waited for until the
health service says SERVING, stopped with SIGTERM. The load report starts a fresh one for every row it
measures, and the tests use it for every test against a real server.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent  # the checkout: `python -m service.server` runs from here
START_TIMEOUT = 60  # seconds for a server to load, bind and warm up on a busy 2-core box


class ServerProcess:
    """`python -m service.server` in a subprocess; stdout and stderr are collected by threads (in .stdout and
    .stderr, a list of lines each). prelude: Python code run first instead (`python -c`), e.g. a test's
    replacement for the engine's warm-up, or the load report's do-nothing Generate (load_report.CEILING)."""

    def __init__(self, model_dir, *args, provider="cpu", prelude=None):
        run = ["-m", "service.server"] if prelude is None else \
            ["-c", f"{prelude}\nfrom data.files import cli\nfrom service.server import main\ncli(main)"]
        self.cmd = [sys.executable, *run, "--model-dir", str(model_dir), "--host", "127.0.0.1",
                    "--port", "0", "--provider", provider, *map(str, args)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.stdout, self.stderr = [], []
        self.port = None
        self._listening = threading.Event()
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))
            if line.startswith("listening on "):
                self.port = int(line.rsplit(":", 1)[1])
                self._listening.set()
        self._listening.set()  # EOF: the process ended (wait_listening then reports why)

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def why_not(self):
        """The server's own last words (its one-line error, if it printed one)."""
        return (self.stderr or self.stdout or ["(no output)"])[-1]

    def wait_listening(self, timeout=START_TIMEOUT):
        self._listening.wait(timeout)
        if self.port is None:
            self.stop(timeout=5)
            raise RuntimeError(f"server did not start: rc={self.proc.poll()} stderr={self.stderr[-5:]}")
        return self

    def wait_serving(self, timeout=START_TIMEOUT):
        """Wait until the health service says SERVING (after the model's warm-up)."""
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    rc = self.proc.poll()
                    self.stop(timeout=5)  # not left running behind the failure
                    raise RuntimeError(f"server not SERVING: rc={rc} stderr={self.stderr[-5:]}")
                time.sleep(0.05)

    def signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def wait(self, timeout=60):
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def stop(self, timeout=30):
        """SIGTERM and wait; SIGKILL if it doesn't exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait(timeout)
