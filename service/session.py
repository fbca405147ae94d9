"""ONNX Runtime sessions for the engine: execution provider selection and the artifacts' metadata.

provider=cuda must really run on CUDA (session.get_providers() is checked: no silent fall-back to the
CPU); provider=auto takes CUDA when it loads and says which provider it got.
"""
import argparse
import ctypes
import json
import logging
import os

import onnxruntime as ort

log = logging.getLogger("namegen.engine")
ort.set_default_logger_severity(3)  # errors only: a failed CUDA probe under provider=auto is expected, not noise
PROVIDER_ADVICE = "; use --provider cpu or auto"  # what a server's user can do about a ProviderError


class ModelFileError(Exception):
    """Missing, corrupt or incompatible model artifacts (one-line message)."""


class ProviderError(Exception):
    """The requested execution provider cannot be used here."""


def _nvidia_driver_present():
    """Is an NVIDIA driver installed (libcuda loads)? Without one, CUDA can't work, and probing ORT's CUDA
    provider only prints load errors."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def cpu_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


PROVIDERS = ("auto", "cpu", "cuda")


def provider_list(text):
    """argparse type of a comma-separated --providers list (verify, bench): every name known, none twice."""
    names = text.split(",")
    if not text or any(n not in PROVIDERS for n in names) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(PROVIDERS)}, got {text!r}")
    return names


def make_session(path, provider="auto", intra_op_threads=1):
    """-> (InferenceSession, "cuda" | "cpu"). provider: cpu | cuda | auto (CUDA if it really loads).

    intra_op_threads=1 by default: this model's ops are too small to split well (on 2 cores, 2 intra-op
    threads measured 2x slower at 64 rows and no faster at 4096); the engine runs row shards in parallel
    instead, one session per thread.
    """
    if provider not in PROVIDERS:
        raise ProviderError(f"provider must be auto, cpu or cuda, got {provider!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    # No NVIDIA driver at all: no CUDA probe (ORT would only print load errors); cuda is refused, auto is CPU.
    driver = provider != "cpu" and _nvidia_driver_present()
    if provider == "cuda" and not driver:
        raise ProviderError("provider=cuda but this machine has no NVIDIA driver (libcuda.so.1)" + PROVIDER_ADVICE)
    if driver and "CUDAExecutionProvider" in ort.get_available_providers():
        if hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN from pip's nvidia-* wheels, when present
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - absence is diagnosed below by get_providers()
                pass
        # use_tf32=0: ORT's CUDA provider defaults to TF32 matrix products on Ampere and newer GPUs. On an
        # H100 that put model.onnx 4.95e-3 from torch (float32: 6.41e-6) and changed 19 of 10,800 names.
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises several types for bad files
        raise ModelFileError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]}); "
                             "run `make export` (or pass the right --model-dir)") from None
    active = "cuda" if sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    if provider == "cuda" and active != "cuda":
        raise ProviderError(
            "provider=cuda but ONNX Runtime's CUDA execution provider did not load here "
            f"(available: {ort.get_available_providers()}; no GPU, driver or CUDA libraries?)" + PROVIDER_ADVICE
        )
    if provider == "auto" and driver and active != "cuda":  # a GPU machine serving on CPU: say so (stderr)
        log.warning("provider=auto: ONNX Runtime's CUDA execution provider did not load (available: %s); using cpu",
                    ort.get_available_providers())
    elif provider == "auto":
        log.info("provider=auto: using %s", active)
    return sess, active


def read_metadata(sess, path, words=True):
    """The export's metadata (export/export.py: metadata); words=False leaves out the word list."""
    props = sess.get_modelmeta().custom_metadata_map
    try:
        meta = json.loads(props["namegen"])
        if words:
            listed = props.get("words", "")
            meta["words"] = listed.split("\n") if listed else []
        meta["vocab"], meta["block_size"]  # noqa: B018 - required keys
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: no namegen metadata ({e}); re-run `make export`") from None
    return meta
