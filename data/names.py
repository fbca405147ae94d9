"""Obtain and load word lists.

The default data set is names.txt from karpathy/makemore (MIT). It is never committed:
we take $NAMES_TXT, else ../shared/data/names.txt beside the checkout, else a cached
download in data/names.txt, else download it, and always check its sha256.
"""
import codecs
import hashlib
import os
import unicodedata
import urllib.request
from pathlib import Path

from data.files import replacing

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_PATH = REPO_ROOT / "data" / "names.txt"
SHARED_PATH = REPO_ROOT.parent / "shared" / "data" / "names.txt"
END = "."  # start/end token; it can't appear inside a word


class DataError(Exception):
    """A data problem with a one-line message that names the fix."""


def sha256_of(path):
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    return h.hexdigest()


def _verified(path):
    digest = sha256_of(path)
    if digest != NAMES_SHA256:
        raise DataError(
            f"{path}: sha256 {digest[:12]}... is not makemore's names.txt ({NAMES_SHA256[:12]}...); the default "
            f"data must be that file (set NAMES_TXT to a good copy, or remove a damaged download); "
            f"to train on another word list, pass it as --data PATH"
        )
    return path


def default_names_path(download=True):
    """Path to a checksum-verified names.txt, downloading it if no local copy exists."""
    env = os.environ.get("NAMES_TXT")
    if env:
        if not Path(env).is_file():
            raise DataError(f"NAMES_TXT={env} is not a file; unset it or fix the path")
        return _verified(Path(env))
    for candidate in (SHARED_PATH, CACHE_PATH):
        if candidate.is_file():
            return _verified(candidate)
    if not download:
        raise DataError(f"names.txt not found (looked at $NAMES_TXT, {SHARED_PATH}, {CACHE_PATH})")
    print(f"downloading {NAMES_URL} -> {CACHE_PATH}")
    with replacing(CACHE_PATH) as tmp:  # only a verified download becomes the cached copy (Ctrl-C included)
        try:
            with urllib.request.urlopen(NAMES_URL, timeout=30) as r:
                tmp.write_bytes(r.read())
        except OSError as e:
            raise DataError(
                f"could not download names.txt from {NAMES_URL} ({e}); "
                f"set NAMES_TXT to a local copy of it, or train on another word list with --data PATH"
            ) from None
        _verified(tmp)
    return CACHE_PATH


def resolve_data_path(path=None):
    """--data PATH if given (any word list), else the verified default names.txt."""
    if path is None:
        return default_names_path()
    p = Path(path)
    if p.is_dir():
        raise DataError(f"--data {path}: is a directory; give a word list file")
    if not p.is_file():
        raise DataError(f"--data {path}: no such file")
    return p


def read_lines(raw, source):
    """A word list's bytes -> [(line number, word)]: one word per line (makemore's contract), blank lines
    skipped, surrounding whitespace stripped, a leading byte-order mark dropped, each word in Unicode NFC
    (so "é" is one character, as keyboards type it, whether the file spells it composed or as "e" and a
    combining accent). source names the file in the error for bytes that aren't UTF-8."""
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start  # offset in the file
        line = raw[:at].count(b"\n") + 1
        raise DataError(f"{source}: not valid UTF-8 (byte {at}, line {line}); re-encode the file as UTF-8") from None
    numbered = [(i, unicodedata.normalize("NFC", w.strip())) for i, w in enumerate(text.splitlines(), 1)]
    return [(i, w) for i, w in numbered if w]


def load_words(path):
    """The words of a training word list (read_lines), each checked: none may hold the end token or a
    control character, and there must be at least one."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:  # unreadable (permissions, I/O error); a missing file was reported before this
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    numbered = read_lines(raw, path)
    if not numbered:
        raise DataError(f"{path}: no words (the file is empty or blank); give one word per line")
    for i, w in numbered:
        if END in w:
            raise DataError(f"{path}: line {i}: word {w!r} contains {END!r}, which is reserved as the start/end token")
        # Control characters (NUL, tab, escapes) are no letters, and the service decodes the end token as NUL.
        bad = sorted({c for c in w if unicodedata.category(c) == "Cc"})
        if bad:
            raise DataError(f"{path}: line {i}: word {w!r} contains control characters {''.join(bad)!r}; "
                            "give one plain word per line")
    return [w for _, w in numbered]


def main(argv=None):
    """`make data`: obtain and verify names.txt. -> exit status."""
    import argparse
    import sys

    argparse.ArgumentParser(
        prog="python -m data.names",
        description="Obtain names.txt ($NAMES_TXT, ../shared/data/names.txt, the cached data/names.txt, or a "
                    f"download from {NAMES_URL}) and verify its sha256. Takes no options.",
    ).parse_args(argv)
    try:
        path = default_names_path()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{path}: sha256 verified ({NAMES_SHA256[:12]}...)")
    return 0


if __name__ == "__main__":
    from data.files import cli

    cli(main)  # Ctrl-C during a download: one line, exit 130
