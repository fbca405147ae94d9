"""service.load_report: the README's load-test table, a fresh server per row."""
import json
import shutil
import subprocess
import sys

import grpc
import pytest

from service import load_report as lr
from tests.service_fixtures import ROOT, ServerProcess, pb, pb_grpc


def run_report(*args):
    return subprocess.run([sys.executable, "-m", "service.load_report", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_load_report_cli(model_dir, tmp_path):
    """Two rows (one with server flags, one with the ceiling's prelude), two rounds in alternating order, each
    against its own server that exits 0 on SIGTERM; the JSON holds every run with the server's peak RSS,
    and the table a line per row."""
    out = tmp_path / "report.json"
    r = run_report("--model-dir", model_dir, "--rows", "c64-no-batching,c64-ceiling", "--rounds", "2", "--warmup", "0.1",
                   "--duration", "60", "--requests", "40", "--procs", "1", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    order = [line.split()[2] for line in r.stdout.splitlines() if line.startswith("  round ")]
    assert order == ["c64-no-batching", "c64-ceiling", "c64-ceiling", "c64-no-batching"]
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"c64-no-batching", "c64-ceiling"}
    for runs in report["rows"].values():
        assert len(runs) == 2
        for run in runs:
            assert run["ok"] == 40 and not run["errors"] and run["server_rc"] == 0 and run["peak_rss_mib"] > 10
    assert [run["concurrency"] for rows in report["rows"].values() for run in rows] == [64] * 4
    assert report["machine"]["timeit_us_before"] > 0 and report["config"]["rounds"] == 2
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 2 and table[2].startswith("| the same, `--max-batch-rows 0` (no batching) |")


def test_each_row_gets_its_own_server_flags(monkeypatch, tmp_path):
    """measure(): the row's server flags and --server-args go to the server, the row's load-test flags come
    last (so its own --warmup wins), and the streams are a fixed count of requests."""
    started, ran, preludes = [], [], []

    class FakeServer:
        target, stdout = "127.0.0.1:1", ["stopped; rss 100.0 MiB, peak rss 123.4 MiB"]

        def __init__(self, model_dir, *args, provider, prelude):
            started.append((args, provider))
            preludes.append(prelude)

        def wait_serving(self):
            return self

        def stop(self):
            return 0

    def fake_run(cmd, **kw):
        ran.append(cmd)
        out = cmd[cmd.index("--json") + 1]
        step = {"ok": 2, "errors": {}, "rps": 1.0, "names_per_s": 1.0, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0}
        with open(out, "w") as f:
            json.dump({"steps": [step]}, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(lr, "ServerProcess", FakeServer)
    monkeypatch.setattr(lr.subprocess, "run", fake_run)
    args = type("Args", (), dict(model_dir=tmp_path, server_args="--event-loop asyncio", provider="cpu", procs=2,
                                 duration=7.0, warmup=1.0, requests=500, stream_seconds=99.0))
    step = lr.measure(lr.BY_KEY["c64-no-batching"], args)
    assert started[-1] == (("--max-batch-rows", "0", "--event-loop", "asyncio"), "cpu")
    assert step["peak_rss_mib"] == 123.4 and step["server_rc"] == 0 and step["ok"] == 2
    cmd = ran[-1]
    assert cmd[cmd.index("--requests") + 1] == "500" and cmd[cmd.index("--duration") + 1] == "7.0"
    assert cmd[-2:] == ["--concurrency", "64"]
    lr.measure(lr.BY_KEY["stream-1m"], args)
    cmd = ran[-1]
    assert cmd[cmd.index("--requests") + 1] == "2" and cmd[cmd.index("--duration") + 1] == "99.0"
    assert cmd[len(cmd) - 1 - cmd[::-1].index("--warmup") + 1] == "0"  # the row's own, after the default
    assert started[-1] == (("--event-loop", "asyncio"), "cpu")
    lr.measure(lr.BY_KEY["c64-ceiling"], args)  # the real server's flags, with the do-nothing Generate
    assert started[-1] == (("--event-loop", "asyncio"), "cpu") and ran[-1][-2:] == ["--concurrency", "64"]
    assert preludes == [None, None, lr.CEILING]


def test_the_ceiling_rows_server_does_nothing(model_dir):
    """The ceiling row's server answers Generate with one fixed name, whatever was asked (it skips validation,
    batching and the model), and is otherwise the real server: health, GetModelInfo, Score."""
    server = ServerProcess(model_dir, prelude=lr.CEILING).wait_serving()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.NameGeneratorStub(channel)
            reply = stub.Generate(pb.GenerateRequest(num_samples=5, seed=3, temperature=-1.0), timeout=10)
            assert [s.name for s in reply.samples] == ["emma"] and reply.seed == 1
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).vocab[0] == "."
            assert len(stub.Score(pb.ScoreRequest(names=["emma", "zed"]), timeout=10).scores) == 2
    finally:
        assert server.stop() == 0


def test_table_gives_each_row_its_range():
    run = lambda rps, p50, rss, errors=None: dict(rps=rps, names_per_s=rps * 2, p50_ms=p50, p90_ms=p50, p99_ms=p50,  # noqa: E731
                                                  errors=errors or {}, peak_rss_mib=rss)
    results = {"c64": [run(1500.4, 30.0, 120.0), run(1900.6, 40.0, 120.04, {"RESOURCE_EXHAUSTED": 2})],
               "c1": [run(800, None, None)], "10k": [run(15.4, 60.0, 130.0)],
               "stream-1m": [run(0.14, 7000.0, 136.5), run(0.13, 7600.0, 137.0)]}
    lines = lr.table(results).splitlines()
    assert lines[2] == "| 1-name Generate, concurrency 1 | 800 | 1,600 | - | - | - | - | - |"  # rows in ROWS order
    assert lines[3] == ("| 1-name Generate, concurrency 64, dynamic batching | 1,500-1,901 | 3,001-3,801 | 30.00-40.00 "
                        "| 30.00-40.00 | 30.00-40.00 | RESOURCE_EXHAUSTED 2 | 120.0 |")
    assert lines[4].startswith("| 10,000-name Generate, concurrency 1 | 15.40 | 30.80 | 60.00 |")  # rates under 100: decimals
    assert lines[5].startswith("| GenerateStream of 1,000,000 names (two streams) | 0.13-0.14 | 0.26-0.28 | 7000.00-7600.00")
    assert len(lines) == 6  # rows not measured are left out


def test_steal_share_and_failed_runs():
    assert lr.steal_share((10, 1000), (30, 1400)) == pytest.approx(0.05)
    assert lr.steal_share(None, (30, 1400)) is None and lr.steal_share((10, 1000), (10, 1000)) is None
    ok, none_ok, bad_exit = dict(ok=5, server_rc=0), dict(ok=0, server_rc=0), dict(ok=5, server_rc=1)
    assert lr.failed([ok, none_ok, bad_exit]) == [none_ok, bad_exit]
    steal, total = lr.cpu_times()  # this machine's own /proc/stat
    assert 0 <= steal <= total


@pytest.mark.parametrize("args, message", [
    (["--rows", "c1,c2"], "--rows: unknown row c2; the rows are c1, c1-no-poll"),
    (["--rounds", "0"], "--rounds must be in [1, 100]"),
    (["--duration", "nan"], "--duration must be finite and > 0"),
    (["--warmup", "-1"], "--warmup must be finite and >= 0"),
    (["--model-dir", "/nonexistent"], "--model-dir /nonexistent: no sampler.onnx there; run `make export` first"),
    (["--json", "/"], "--json /: is a directory"),
])
def test_load_report_bad_options(model_dir, args, message):
    r = run_report("--model-dir", model_dir, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_load_report_when_the_server_cannot_start(model_dir, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    (bad / "model.onnx").write_bytes(b"not a model")
    r = run_report("--model-dir", bad, "--rows", "c1", "--json", tmp_path / "r.json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: c1: the server did not start: error: ") and "model.onnx" in line
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("ok, server_rc, rc, message", [
    (3, 0, 0, None), (0, 0, 1, "error: c1: no request succeeded"), (3, 1, 1, "error: c1: the server exited 1"),
])
def test_load_report_exit_status(model_dir, tmp_path, monkeypatch, capsys, ok, server_rc, rc, message):
    """Exit 1 when a row can't stand (no request succeeded, or the server didn't exit 0); the JSON is written anyway."""
    step = dict(ok=ok, errors={} if ok else {"UNAVAILABLE": 5}, rps=1.0, names_per_s=1.0, p50_ms=None, p90_ms=None,
                p99_ms=None, peak_rss_mib=120.0, server_rc=server_rc)
    monkeypatch.setattr(lr, "measure", lambda row, args: dict(step))
    monkeypatch.setattr(lr, "machine_probe", lambda: 190.0)
    out = tmp_path / "r.json"
    assert lr.main(["--model-dir", str(model_dir), "--rows", "c1", "--json", str(out)]) == rc
    err = capsys.readouterr().err
    assert (message in err) if message else err == ""
    assert len(json.loads(out.read_text())["rows"]["c1"]) == 2  # two rounds by default
