"""Data: obtaining names.txt, and clear one-line errors for bad word lists."""
import subprocess
import sys
from pathlib import Path

import pytest

from data.names import NAMES_SHA256, DataError, default_names_path, load_words, resolve_data_path, sha256_of
from trainer.dataset import split_words

ROOT = Path(__file__).resolve().parent.parent


def test_default_names_verified(words):
    path = default_names_path(download=False)
    assert sha256_of(path) == NAMES_SHA256
    assert len(words) == 32033 and words[0] == "emma"


def test_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    bad = tmp_path / "names.txt"
    bad.write_text("emma\nolivia\n")
    monkeypatch.setenv("NAMES_TXT", str(bad))
    with pytest.raises(DataError, match="sha256 .* is not makemore's names.txt.*another word list, pass it as --data"):
        default_names_path()  # not advice to delete the user's own word list


def test_names_txt_env_missing(monkeypatch, tmp_path, capsys):
    from data.names import main

    assert main([]) == 0 and "sha256 verified" in capsys.readouterr().out  # `make data`, as the suite finds it
    monkeypatch.setenv("NAMES_TXT", str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="NAMES_TXT"):
        default_names_path()
    assert main([]) == 1 and capsys.readouterr().err.startswith("error: NAMES_TXT=")  # one line, no traceback


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "no words"),
        (b"\n  \n\t\n", "no words"),
        (b"emma\n\xff\xfeolivia\n", "not valid UTF-8.*line 2"),
        (b"\xef\xbb\xbfemma\n\xff\n", r"not valid UTF-8 \(byte 8, line 2\)"),  # offsets count the byte-order mark
        (b"emma\nst.john\n", "line 2: .*reserved"),
        (b".ann\nemma\n", "line 1: .*reserved"),
        (b"emma\nann.\n", "line 2: .*reserved"),
        (b"emma\nno\x00ra\n", "line 2: .*control characters '\\\\x00'"),
        (b"emma\nno\tra\n", "control characters"),
    ],
)
def test_bad_word_lists(tmp_path, content, match):
    f = tmp_path / "words.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_words(f)


def test_other_word_list_and_blank_lines(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("\ufeffzoë\r\n\r\n  ana \r\n")  # as a Windows editor saves it: byte-order mark, CRLF
    assert load_words(f) == ["zoë", "ana"]


def test_words_are_nfc(tmp_path):
    f = tmp_path / "accents.txt"
    f.write_text("e\u0301mile\n\u00e9lise\n")  # "émile" spelt as e + combining accent, "élise" composed
    assert load_words(f) == ["\u00e9mile", "\u00e9lise"]  # one "é" character each: one vocabulary entry


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        resolve_data_path("/nonexistent/words.txt")
    with pytest.raises(DataError, match="is a directory"):
        resolve_data_path(tmp_path)


def test_unreadable_data_file(tmp_path, monkeypatch):
    """A file that exists but can't be read (permissions, an I/O error) is a DataError, not an OSError."""
    from pathlib import Path

    f = tmp_path / "words.txt"
    f.write_text("emma\n")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(DataError, match="cannot read it .Permission denied"):
        load_words(f)
    with pytest.raises(DataError, match="cannot read it .Permission denied"):
        sha256_of(f)


def test_too_few_words_for_a_split():
    with pytest.raises(DataError, match=r"3 words are too few .*\(val would be empty\)"):
        split_words(["ann", "bo", "cy"])
    assert [len(v) for v in split_words([str(i) for i in range(10)]).values()] == [8, 1, 1]


@pytest.mark.parametrize("content", [None, b"", b"\xff\xff\n", b"ann\nbo\ncy\n"])
def test_train_cli_bad_data_one_line_error(tmp_path, content):
    path = tmp_path / "words.txt"
    if content is not None:
        path.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--data", str(path), "--out-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in r.stderr


@pytest.fixture
def local_copies(tmp_path, monkeypatch):
    """(data.names with its shared and cached copies of names.txt in tmp_path, neither there yet, and no
    $NAMES_TXT; the real names.txt's bytes)."""
    import data.names as dn

    good = default_names_path(download=False).read_bytes()
    monkeypatch.delenv("NAMES_TXT", raising=False)
    monkeypatch.setattr(dn, "SHARED_PATH", tmp_path / "shared" / "names.txt")
    monkeypatch.setattr(dn, "CACHE_PATH", tmp_path / "cache" / "names.txt")
    dn.SHARED_PATH.parent.mkdir()
    dn.CACHE_PATH.parent.mkdir()
    return dn, good


def test_local_copies_are_verified_in_order(local_copies):
    dn, good = local_copies
    with pytest.raises(DataError, match="names.txt not found"):
        dn.default_names_path(download=False)
    dn.CACHE_PATH.write_text("emma\nolivia\n")  # a damaged cached copy is refused, not trained on
    with pytest.raises(DataError, match="sha256 .* remove a damaged download"):
        dn.default_names_path(download=False)
    dn.SHARED_PATH.write_bytes(good)  # ../shared/data/names.txt comes before the cache
    assert dn.default_names_path(download=False) == dn.SHARED_PATH


def test_download_is_verified_and_failures_are_one_line_errors(local_copies, monkeypatch):
    import io
    import urllib.error

    dn, good = local_copies

    def serve(body):
        monkeypatch.setattr(dn.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(body))

    def offline(url, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    serve(b"emma\nolivia\n")  # a changed or truncated upstream file
    with pytest.raises(DataError, match="sha256"):
        dn.default_names_path()
    assert list(dn.CACHE_PATH.parent.iterdir()) == []  # nothing left behind to be found next time
    monkeypatch.setattr(dn.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download names.txt .*set NAMES_TXT"):
        dn.default_names_path()
    serve(good)
    assert dn.default_names_path() == dn.CACHE_PATH and sha256_of(dn.CACHE_PATH) == NAMES_SHA256
    assert [p.name for p in dn.CACHE_PATH.parent.iterdir()] == ["names.txt"]
