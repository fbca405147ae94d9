"""Outputs are written whole or not at all, their place is checked before the work, and a model is served
only with the checkpoint it was exported from (data/files.py and the steps that write artifacts/)."""
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from data.files import cli, replacing, unwritable, write_text

ROOT = Path(__file__).resolve().parent.parent


def test_replacing_keeps_the_old_file_until_the_write_succeeds(tmp_path):
    path = tmp_path / "out" / "report.json"
    write_text(path, "old\n")  # the folder is created
    with pytest.raises(KeyboardInterrupt):
        with replacing(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt  # Ctrl-C mid-write
    assert path.read_text() == "old\n" and [p.name for p in path.parent.iterdir()] == ["report.json"]
    with replacing(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".json" and tmp.name.startswith(".")
        tmp.write_text("new\n")
    assert path.read_text() == "new\n" and [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_unwritable_names_the_flag_and_the_reason(tmp_path):
    assert unwritable(tmp_path / "a.json", "--json") is None
    assert unwritable(tmp_path, "--json") == f"--json {tmp_path}: is a directory; give a file path"
    assert "not a writable folder" in unwritable(tmp_path / "missing" / "a.json", "--json")
    assert unwritable(tmp_path / "missing" / "a.png", "--out", create=True) is None  # created on writing
    (tmp_path / "file").write_text("")
    assert "not a writable folder" in unwritable(tmp_path / "file" / "a.png", "--out", create=True)


def test_unwritable_without_permission(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (the tests may run as root, who may write anywhere)
    assert "not a writable folder" in unwritable(tmp_path / "a.json", "--json")


def test_stubs_are_regenerated_when_missing_or_older_than_the_proto(tmp_path, monkeypatch):
    import os

    from service import gen_proto

    proto, out = tmp_path / "namegen.proto", tmp_path / "namegen_pb"
    proto.write_text("")
    out.mkdir()
    monkeypatch.setattr(gen_proto, "PROTO", proto)
    monkeypatch.setattr(gen_proto, "OUT", out)
    assert gen_proto.stale()  # no stubs
    for name in gen_proto.STUBS:
        (out / name).write_text("")
        os.utime(out / name, (1000, 1000))
    os.utime(proto, (2000, 2000))
    assert gen_proto.stale()  # the proto changed since
    os.utime(proto, (500, 500))
    assert not gen_proto.stale()


def test_cli_exit_status_and_interrupt(capsys, monkeypatch):
    import signal

    handlers = []
    monkeypatch.setattr(signal, "signal", lambda sig, handler: handlers.append((sig, handler)))  # not this process's

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        cli(interrupted)
    assert exc.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"  # no traceback
    for returned, code in ((None, 0), (3, 3), ({"val_loss": 2.1}, 0)):  # trainer.train's main returns its metrics
        with pytest.raises(SystemExit) as exc:
            cli(lambda r=returned: r)
        assert exc.value.code == code
    # Once main has returned, Ctrl-C is ignored: the work is done, and exiting must not end in a traceback.
    assert handlers == [(signal.SIGINT, signal.SIG_IGN)] * 3


@pytest.mark.parametrize("parent", ["default", "ignored"])
def test_ctrl_c_while_a_command_starts_up_is_one_line(parent, tmp_path):
    """`python -m trainer.train` imports torch for a second or two before main(): a Ctrl-C then ends with
    one line and status 130, not an import traceback (quiet_start), after the interrupted code's finally
    blocks ran. A SIGINT that the parent ignored (a background job) stays ignored."""
    import signal
    import subprocess
    import sys

    disposition = signal.SIG_DFL if parent == "default" else signal.SIG_IGN
    marker = tmp_path / "unwound"
    # sys.argv[0] is "-m" while Python locates a module to run as `python -m` (a package's __init__ sees it).
    code = ("import sys; sys.argv[0] = '-m'; import trainer, os, signal, time, pathlib\n"
            "try:\n    os.kill(os.getpid(), signal.SIGINT); time.sleep(1)\n"
            f"finally:\n    pathlib.Path({str(marker)!r}).touch()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    assert (r.returncode, r.stderr.strip()) == ((130, "interrupted") if parent == "default" else (0, ""))
    assert marker.exists()  # the interrupt unwound the stack (temporary files get removed)
    # Imported as a library (not `python -m`), the packages leave Python's handling alone.
    code = "import sys, trainer, export, service; sys.exit(sys.excepthook is not sys.__excepthook__)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_every_command_runs_under_cli():
    """Each `python -m` command's main runs under data.files.cli, which turns Ctrl-C into one line and removes
    half-written files; a command outside it would print a traceback."""
    import ast

    commands = 0
    for path in sorted(p for d in ("data", "trainer", "export", "service") for p in (ROOT / d).glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                commands += 1
                assert ast.unparse(node.body[-1]).startswith("cli(main)"), path
    assert commands >= 10  # data.names, trainer.train, lr_sweep, export.export, verify, bench, server, client, ...


def test_interrupted_checkpoint_save_keeps_the_previous_one(tiny_checkpoint, tiny_model_dir, tmp_path, monkeypatch):
    from trainer.checkpoint import save_checkpoint
    from trainer.recipe import TrainConfig

    path = tmp_path / "model.pt"
    shutil.copy(tiny_model_dir / "model.pt", path)
    before = path.read_bytes()

    def cut_short(obj, f):
        Path(f).write_bytes(before[:668])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut_short)
    model, vocab, ckpt = tiny_checkpoint
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, vocab, ckpt["words"], ckpt["split_seed"], TrainConfig(), ckpt["metrics"])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_graphs_are_served_only_with_their_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """Export writes beside its checkpoint by default; a retrained checkpoint, or an export interrupted
    between its two graphs, leaves files the engine refuses (one line naming `make export`) rather than
    serving another model than the folder's checkpoint."""
    from export.export import main as export_main
    from service.engine import Engine
    from service.session import ModelFileError

    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(tiny_model_dir / "model.pt", d / "model.pt")
    export_main(["--checkpoint", str(d / "model.pt")])  # no --out-dir: beside it, not over artifacts/
    assert sorted(p.name for p in d.iterdir()) == ["model.onnx", "model.pt", "sampler.onnx"]
    Engine(d, provider="cpu", threads=1)

    ckpt = torch.load(d / "model.pt", weights_only=True)
    ckpt["metrics"]["steps"] += 1  # retrained (or restored with an old date, so make didn't re-export)
    torch.save(ckpt, d / "model.pt")
    with pytest.raises(ModelFileError, match="exported from another checkpoint than .*model.pt.*run `make export`"):
        Engine(d, provider="cpu", threads=1)

    old_sampler = (d / "sampler.onnx").read_bytes()
    save = onnx.save

    def interrupted_at_the_sampler(graph, f, *args, **kw):
        save(graph, f, *args, **kw)
        if Path(f).name.startswith(".sampler."):
            raise KeyboardInterrupt  # Ctrl-C while sampler.onnx is written

    monkeypatch.setattr(onnx, "save", interrupted_at_the_sampler)
    with pytest.raises(KeyboardInterrupt):
        export_main(["--checkpoint", str(d / "model.pt")])
    assert (d / "sampler.onnx").read_bytes() == old_sampler  # not half of a new one
    assert sorted(p.name for p in d.iterdir()) == ["model.onnx", "model.pt", "sampler.onnx"]
    with pytest.raises(ModelFileError, match="different checkpoints"):  # model.onnx is the new one
        Engine(d, provider="cpu", threads=1)

    monkeypatch.setattr(onnx, "save", save)
    export_main(["--checkpoint", str(d / "model.pt")])
    Engine(d, provider="cpu", threads=1)


def test_interrupted_training_leaves_no_files_of_another_model(tmp_path, monkeypatch, capsys):
    """A run stopped while it saves or draws leaves the files it wrote and no metrics or plots of the run
    before, which would describe another model; so does a run under --no-plots."""
    import trainer.train as tt
    from trainer import plots
    from trainer.train import main

    pdir = tmp_path / "plots"
    pdir.mkdir()

    def earlier_run(names=plots.PLOTS):
        for name in names:
            (pdir / name).write_bytes(b"an earlier run's plot")

    earlier_run()
    (tmp_path / "metrics.json").write_text("an earlier run's metrics")
    (tmp_path / "model.pt").write_bytes(b"an earlier run's model")

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # stopped as the checkpoint is saved: the old one stays, alone
        m.setattr(tt, "save_checkpoint", interrupted)
        with pytest.raises(KeyboardInterrupt):
            main(["--preset", "tiny", "--steps", "30", "--out-dir", str(tmp_path), "--no-progress", "--threads", "1",
                  "--no-plots"])
    assert (tmp_path / "model.pt").read_bytes() == b"an earlier run's model"
    assert not (tmp_path / "metrics.json").exists() and list(pdir.iterdir()) == []  # missing, not another model's

    earlier_run()
    monkeypatch.setattr(plots, "plot_init_comparison", interrupted)  # the sixth plot
    with pytest.raises(KeyboardInterrupt):
        main(["--preset", "tiny", "--steps", "30", "--eval-every", "30", "--out-dir", str(tmp_path), "--no-progress",
              "--threads", "1"])
    # 30 steps are too few to beat the bigram baseline: the run says so.
    assert "is worse than the bigram baseline's" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 30  # saved before the plots
    assert sorted(p.name for p in pdir.iterdir()) == sorted(plots.PLOTS[:5])  # the new ones; no old, no partial
    assert all((pdir / name).read_bytes()[:4] == b"\x89PNG" for name in plots.PLOTS[:5])
    earlier_run()
    main(["--preset", "tiny", "--steps", "30", "--out-dir", str(tmp_path), "--no-progress", "--threads", "1",
          "--no-plots"])
    assert list(pdir.iterdir()) == []  # a run without plots leaves none of the last run's beside its model


def test_verify_keeps_its_report_when_nothing_could_be_checked(tiny_model_dir, tmp_path, capsys, cuda_loads):
    from export.verify import main

    if cuda_loads:
        pytest.skip("CUDA loads here: verify would check it")
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    (d / "verify.json").write_text('{"cpu": "the last real report"}\n')
    assert main(["--model-dir", str(d), "--providers", "cuda"]) == 1
    out = capsys.readouterr().out
    assert (d / "verify.json").read_text() == '{"cpu": "the last real report"}\n'
    assert "FAIL: nothing was checked" in out and "--provider cpu" not in out  # the server's flag, not verify's
