"""The command-line tools against a real server: service.client and service.loadtest."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service_fixtures import ROOT, free_port, gen, names_of, pb, rpcs_counted, start_server


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_client_cli(server, tmp_path):
    r = run_cli("service.client", "--target", server.target, "generate", "-n", "3", "--seed", "5")
    assert r.returncode == 0 and "seed: 5" in r.stdout and len(r.stdout.splitlines()) == 4, r.stderr
    r = run_cli("service.client", "generate", "--target", server.target, "--temperature", "0")
    assert r.returncode == 1 and r.stderr.startswith("error: INVALID_ARGUMENT: temperature") and "Traceback" not in r.stderr
    r = run_cli("service.client", "--target", server.target, "info")
    info = json.loads(r.stdout)  # integers read as integers, not "12097" or 3.0
    assert r.returncode == 0 and isinstance(info["num_params"], int) and isinstance(info["config"]["block_size"], int)
    assert info["num_params"] > 0 and isinstance(info["metrics"]["val_loss"], float)
    r = run_cli("service.client", "--target", server.target, "score", "emma", "")
    emma, empty = r.stdout.splitlines()
    # name, total, then each character's logprob and the end token's
    assert r.returncode == 0 and emma.split()[0] == "emma" and [w[:2] for w in emma.split()[2:]] == ["e:", "m:", "m:", "a:", ".:"]
    assert empty.split()[0] == '""' and empty.split()[2].startswith(".:") and len(empty.split()) == 3, r.stdout
    listed = tmp_path / "names.txt"
    listed.write_text("emma\n\n olivia \n")  # a word list: blank lines skipped, spaces stripped
    r = run_cli("service.client", "--target", server.target, "score", "zoe", "--file", listed)
    assert r.returncode == 0 and [line.split()[0] for line in r.stdout.splitlines()] == ["zoe", "emma", "olivia"], r.stderr


def test_client_prints_what_the_server_answered(server, stub, tmp_path):
    """Each generate line is the reply's name, logprob and training-data tag; the seed line is the reply's;
    --only-new is sent; a stream file holds the names in order; score prints the reply's total."""
    for flags, kw in ((["--seed", "9"], dict(seed=9)), (["--seed", "9", "--only-new"], dict(seed=9, only_new=True))):
        r = run_cli("service.client", "--target", server.target, "generate", "-n", "30", *flags)
        *lines, seed = r.stdout.splitlines()
        want = gen(stub, num_samples=30, **kw)
        assert r.returncode == 0 and seed == "seed: 9", r.stderr
        assert [line.split() for line in lines] == [
            [s.name or '""', f"{s.logprob:.4f}", "[train]" if s.in_training_data else "[new]"] for s in want.samples]
        assert any(s.in_training_data for s in want.samples) != ("--only-new" in flags)
    r = run_cli("service.client", "--target", server.target, "generate", "-n", "2")
    drawn = int(r.stdout.splitlines()[-1].removeprefix("seed: "))  # the seed the server drew, reproducing the names
    assert r.stdout.splitlines()[:-1] == run_cli("service.client", "--target", server.target, "generate", "-n", "2",
                                                 "--seed", drawn).stdout.splitlines()[:-1]
    out = tmp_path / "names.txt"
    r = run_cli("service.client", "--target", server.target, "stream", "-n", "25", "--chunk-size", "10", "--seed", "4",
                "--out", out)
    assert r.returncode == 0 and out.read_text().splitlines() == names_of(gen(stub, num_samples=25, seed=4))
    r = run_cli("service.client", "--target", server.target, "score", "emma", "zzyzx")
    got = [line.split()[1] for line in r.stdout.splitlines()]
    assert got == [f"{s.logprob:.4f}" for s in stub.Score(pb.ScoreRequest(names=["emma", "zzyzx"]), timeout=10).scores]


def test_client_sends_nfc_text():
    from service.client import parse_args, request_of

    req = request_of(parse_args(["generate", "--prefix", "e\u0301"]))
    assert req.prefix == "\u00e9"  # as the training words are read (data.names.read_lines)


def test_client_pads_names_by_terminal_columns():
    """Names from any word list line up: a wide character takes two columns, a mark on the character before
    it or a zero-width joiner none (NFC leaves such marks where no composed letter exists: Thai, Devanagari)."""
    from service.client import cells, ljust

    words = ("emma", "zoë", "zoe\u0308", "はな", "สมศักดิ์", "नीलं", "a\u200db", "")
    assert [cells(w) for w in words] == [4, 3, 3, 4, 5, 3, 2, 0]
    assert ljust("はな", 6) == "はな  " and ljust("emma", 6) == "emma  " and ljust("zoe\u0308", 4) == "zoe\u0308 "


def test_client_target_forms():
    from service.client import channel_target

    assert channel_target(" 127.0.0.1:50051 ") == "127.0.0.1:50051"
    assert channel_target("::1:50051") == channel_target("[::1]:50051") == "[::1]:50051"  # as the server prints it
    assert channel_target("dns:///localhost:50051") == "dns:///localhost:50051"


@pytest.mark.parametrize("args, message", [
    (("generate", "--seed", "-5"), "error: --seed -5: out of range"),  # the message's field is uint64
    (("generate", "-n", str(1 << 40)), "error: --num-samples"),
    (("stream", "-n", "3", "--out", "/nonexistent-dir/names.txt"), "error: --out /nonexistent-dir/names.txt: cannot write"),
    (("stream", "-n", "3", "--out", ""), "error: --out '': give a file name"),
    (("generate", "--timeout", "nan"), "error: --timeout nan: give a finite number"),
    (("generate", "--prefix", os.fsdecode(b"\xe9")), "error: --prefix b'\\xe9': not valid UTF-8"),
    (("score", "emma", os.fsdecode(b"\xe9mma")), "error: name b'\\xe9mma': not valid UTF-8"),
    (("score",), "error: give names to score, or --file"),
    (("score", "--file", "/nonexistent-dir/names.txt"), "error: --file /nonexistent-dir/names.txt: cannot read"),
    (("info", "--target", ""), "error: --target '': give HOST:PORT"),
    (("info", "--target", "127.0.0.1"), "error: --target '127.0.0.1': give HOST:PORT"),  # not port 443
    (("info", "--target", "127.0.0.1:99999"), "error: --target '127.0.0.1:99999': give HOST:PORT with a port in"),
])
def test_client_cli_bad_options(server, args, message):
    r = run_cli("service.client", "--target", server.target, *args)
    assert r.returncode == 1 and r.stderr.startswith(message) and "Traceback" not in r.stderr, r.stderr


def test_client_stream_keeps_the_out_file_until_it_succeeds(server, tmp_path):
    out = tmp_path / "names.txt"
    out.write_text("keep\n")
    r = run_cli("service.client", "--target", server.target, "stream", "-n", "3", "--prefix", "Q", "--out", out)
    assert r.returncode == 1 and "INVALID_ARGUMENT: prefix" in r.stderr and out.read_text() == "keep\n"
    assert list(tmp_path.iterdir()) == [out]  # no .part file left behind
    r = run_cli("service.client", "--target", server.target, "stream", "-n", "3", "--seed", "1", "--out", out)
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 3 and list(tmp_path.iterdir()) == [out]
    r = run_cli("service.client", "--target", server.target, "stream", "-n", "3", "--out", "/dev/null")
    assert r.returncode == 0 and "3 names" in r.stderr and not Path("/dev/.null.part").exists()  # not a file: as is


def test_loadtest_cli(server, tmp_path):
    out = tmp_path / "lt.json"
    r = run_cli("service.loadtest", "--target", server.target, "--concurrency", "1,4", "--warmup", "0.1",
                "--duration", "60", "--requests", "50", "--procs", "2", "--json", out)  # the count ends each step
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert [s["concurrency"] for s in steps] == [1, 4] and all(s["ok"] == 50 and not s["errors"] for s in steps)
    assert report["config"]["requests"] == 50 and all(s["seconds"] < 30 for s in steps)
    # Without --requests, the duration ends the step.
    r = run_cli("service.loadtest", "--target", server.target, "--concurrency", "2", "--warmup", "0.2",
                "--duration", "1", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    (step,) = json.loads(out.read_text())["steps"]
    assert step["ok"] > 0 and 0.5 < step["seconds"] <= 1.5


def test_loadtest_tally_counts_after_the_warm_up_up_to_the_quota():
    import time

    from service.load_workers import Tally

    cfg = dict(warmup=60, duration=60, rpc="generate", names=3, max_length=10, only_new=True, seed=None, seed_base=5)
    t = Tally(cfg, quota=2, t_start=time.monotonic())
    req, counted = t.next()
    assert not counted and req.only_new and req.num_samples == 3 and req.seed == 5  # warming up
    t.record(counted, 0.5, 3, None)
    assert t.lat == [] and t.names == 0 and t.started == 0
    t = Tally(cfg | dict(warmup=0), quota=2, t_start=time.monotonic())
    assert [t.next()[1], t.next()[1], t.next()] == [True, True, None]  # the quota ends the step


def test_loadtest_step_arithmetic():
    """A step's report from its processes' tallies: percentiles over every OK latency, failed requests counted,
    rates over the longest process's time, the first message of each error code; --requests split by share."""
    import random

    from service.loadtest import run_step

    jobs = []

    class Pool:  # the processes' tallies, made up: 100 latencies of 1..100 ms, shuffled over two processes
        def map(self, fn, args):
            jobs.extend(args)
            lat = [i / 1000 for i in range(1, 101)]
            random.Random(0).shuffle(lat)
            return [{"lat": lat[:30], "errors": {"UNAVAILABLE": 2}, "details": {"UNAVAILABLE": "first"},
                     "span": 2.0, "names": 300},
                    {"lat": lat[30:], "errors": {"UNAVAILABLE": 1, "INVALID_ARGUMENT": 1},
                     "details": {"UNAVAILABLE": "second", "INVALID_ARGUMENT": "bad"}, "span": 1.0, "names": 700}]

    s = run_step({"procs": 2, "requests": 50, "seed_base": 0}, 3, Pool())
    assert [(share, quota) for _, share, quota, _ in jobs] == [(2, 33), (1, 17)]
    assert (s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"]) == pytest.approx((51, 91, 100, 100))
    assert (s["requests"], s["ok"], s["seconds"], s["rps"], s["names_per_s"]) == (104, 100, 2.0, 50, 500)
    assert s["errors"] == {"UNAVAILABLE": 3, "INVALID_ARGUMENT": 1}
    assert s["error_details"] == {"UNAVAILABLE": "first", "INVALID_ARGUMENT": "bad"}


@pytest.mark.parametrize("oks, rc", [([5, 0], 1), ([0, 5], 1), ([5, 5], 0)])
def test_loadtest_fails_when_any_step_had_no_success(monkeypatch, capsys, oks, rc):
    import service.loadtest as lt

    made = iter(oks)
    monkeypatch.setattr(lt, "check_server", lambda cfg: None)
    monkeypatch.setattr(lt, "worker_pool", lambda procs: None)
    monkeypatch.setattr(lt, "run_step", lambda cfg, c, pool: {
        "concurrency": c, "requests": 5, "ok": (ok := next(made)), "rps": ok, "names_per_s": ok, "p50_ms": None,
        "p90_ms": None, "p99_ms": None, "errors": {} if ok else {"UNAVAILABLE": 5}, "error_details": {}})
    assert lt.main(["--concurrency", "1,2"]) == rc
    assert len(capsys.readouterr().out.splitlines()) == 4  # the settings, the header, a row per step


@pytest.mark.parametrize("client", ["sync", "aio"])
def test_loadtest_balances_replicas(server, model_dir, tmp_path, client):
    """Several targets: round_robin sends each replica a share of the requests (both sync and aio clients)."""
    replica = start_server(model_dir, "--metrics-port", free_port())
    try:
        before = rpcs_counted(server, "Generate", "OK"), rpcs_counted(replica, "Generate", "OK")
        out = tmp_path / "lt.json"
        r = run_cli("service.loadtest", "--target", f"{server.target},{replica.target}", "--concurrency", "2",
                    "--client", client, "--warmup", "0", "--duration", "60", "--requests", "40", "--json", out)
        assert r.returncode == 0, r.stdout + r.stderr
        (step,) = json.loads(out.read_text())["steps"]
        served = rpcs_counted(server, "Generate", "OK") - before[0], rpcs_counted(replica, "Generate", "OK") - before[1]
        assert step["ok"] >= 40 and sum(served) >= 40 and min(served) >= 10, served  # round robin: ~half each
    finally:
        assert replica.stop() == 0


@pytest.mark.parametrize("client", ["sync", "aio"])
def test_loadtest_score(server, tmp_path, client):
    out = tmp_path / "lt.json"
    r = run_cli("service.loadtest", "--target", server.target, "--rpc", "score", "--names-per-request", "3",
                "--concurrency", "2", "--client", client, "--warmup", "0", "--duration", "60", "--requests", "20",
                "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    (step,) = json.loads(out.read_text())["steps"]
    assert step["ok"] >= 20 and not step["errors"] and step["names_per_s"] == pytest.approx(3 * step["rps"])


@pytest.mark.parametrize("rpc", ["generate", "score"])
def test_loadtest_without_a_server(rpc):
    """One line before any step (`make load` before `make serve`), not a table of failed steps."""
    r = run_cli("service.loadtest", "--target", f"127.0.0.1:{free_port()}", "--rpc", rpc, "--duration", "1")
    assert r.returncode == 1 and r.stderr.startswith("error: no namegen server at 127.0.0.1:"), r.stderr
    assert "make serve" in r.stderr and "conc" not in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("client", ["sync", "aio"])
def test_loadtest_reports_why_requests_failed(server, client):
    r = run_cli("service.loadtest", "--target", server.target, "--max-length", "65", "--warmup", "0",
                "--duration", "60", "--requests", "5", "--client", client)
    assert r.returncode == 1, r.stdout + r.stderr  # nothing succeeded
    assert "INVALID_ARGUMENT=5" in r.stdout and "INVALID_ARGUMENT: max_length: must be in" in r.stdout


@pytest.mark.parametrize("flag, value", [("--duration", "nan"), ("--warmup", "-5"), ("--timeout", "0"), ("--seed", "-1"),
                                         ("--names-per-request", "99999999999"), ("--requests", "-5"),
                                         ("--json", "/nonexistent-dir/x.json"), ("--json", "."),
                                         ("--target", "127.0.0.1:99999")])
def test_loadtest_bad_options(flag, value, capsys):
    from service.loadtest import main

    with pytest.raises(SystemExit) as exc:
        main([flag, value])
    assert exc.value.code != 0 and flag.lstrip("-") in capsys.readouterr().err + str(exc.value.code)
