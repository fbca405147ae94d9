"""Writing outputs safely, for every step that writes under artifacts/ (torch-free).

- replacing(path): a file appears whole or not at all. Ctrl-C or a crash while model.pt, an ONNX graph or a
  plot is written leaves the previous file (or none), never a truncated one that a later step would trust.
- unwritable(path, flag): an output's place is checked before the work that fills it, not after.
- cli(main): Ctrl-C ends a command with one line and exit status 130 instead of a traceback.
- quiet_start(): so does a Ctrl-C before main(), while `python -m` imports torch or onnxruntime.
"""
import contextlib
import os
import signal
import sys
from pathlib import Path


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path beside `path` to write to; on success it replaces `path` in one rename (atomic
    on one file system). The temporary name keeps the suffix, for writers that go by it (savefig, onnx.save),
    and starts with a dot; it is removed when the write fails or is interrupted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename


def write_text(path, text):
    with replacing(path) as tmp:
        tmp.write_text(text)
    return path


def unwritable(path, flag, create=False):
    """Why a file can't be written at `path` (given as `flag`, e.g. "--json"), or None. Its folder must be a
    writable folder; with create=True it may not exist yet (replacing() creates it), and the nearest existing
    parent must be one."""
    path = Path(path)
    if path.is_dir():
        return f"{flag} {path}: is a directory; give a file path"
    folder = path.absolute().parent
    while create and not folder.exists():
        folder = folder.parent
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        return f"{flag} {path}: cannot write there ({folder} is not a writable folder)"
    return None


def _interrupted_hook(kind, value, tb):
    """sys.excepthook of a command started by `python -m` (quiet_start)."""
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, tb)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.write(2, b"\ninterrupted\n")
    # The interrupt has unwound (every finally ran: no temporary files are left). Exit now with cli()'s
    # status, rather than let Python end the process by SIGINT (status -2 to a subprocess caller).
    os._exit(130)


def quiet_start():
    """Each package's __init__ calls this (data's runs first, as the others import data.files). When Python is
    locating a module to run as `python -m package.module` (sys.argv[0] is "-m" until then), a Ctrl-C before
    main() starts, while the module imports torch or onnxruntime (a second or two), then ends with one line
    and status 130 instead of an import traceback. Once main runs, cli() handles Ctrl-C itself."""
    if sys.argv[:1] == ["-m"]:
        sys.excepthook = _interrupted_hook


def cli(main):
    """Run a command's main(): an int it returns is the exit status; Ctrl-C prints "interrupted" and exits
    with 130 (128 + SIGINT, as a shell reports it), after replacing() has removed any half-written file."""
    try:
        rc = main()
        # Done: a Ctrl-C while main's objects are torn down and the process exits would only print a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
