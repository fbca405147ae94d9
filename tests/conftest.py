"""Shared fixtures: the real names.txt, and a tiny model trained and exported once per test session."""
import pytest
import torch

from data.names import default_names_path, load_words
from trainer.dataset import Vocab, split_words

pytest_plugins = ["tests.service_fixtures"]  # servers, stubs and recording engines for the service tests


@pytest.fixture(scope="session")
def words():
    return load_words(default_names_path())  # the local copy, else downloaded once into data/ (and verified)


@pytest.fixture(scope="session")
def vocab(words):
    return Vocab.from_words(words)


@pytest.fixture(scope="session")
def splits(words):
    return split_words(words)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`trainer.train --preset tiny` + `export.export` into a temp dir: model.pt, model.onnx, sampler.onnx."""
    from export.export import export
    from trainer.train import main as train_main

    out = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    # One torch thread: for batch-64 steps it is as fast as two, and far faster when the cores are shared.
    train_main(["--preset", "tiny", "--out-dir", str(out), "--no-plots", "--no-progress", "--threads", "1"])
    export(out / "model.pt", out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_dir):
    from trainer.checkpoint import load_checkpoint

    return load_checkpoint(tiny_model_dir / "model.pt")  # (model, vocab, ckpt)


@pytest.fixture(scope="session")
def cpu_engine(tiny_model_dir):
    from service.engine import Engine

    return Engine(tiny_model_dir, provider="cpu", threads=2)


@pytest.fixture(scope="session")
def cuda_loads(tiny_model_dir):
    """Does ONNX Runtime's CUDA provider really load here (provider=cuda)?"""
    from service.engine import Engine
    from service.session import ProviderError

    try:
        Engine(tiny_model_dir, provider="cuda")
        return True
    except ProviderError:
        return False
