"""The on-disk cache of built Verilator models: atomic, locked, self-repairing.

A model is built once per key and kept in ``<cache root>/rtl/<name>-<key>/``. The entry is
only ever seen whole:

* **atomic**: a build runs in a private folder (``.build-<name>-<key>-<pid>-<random>``) next
  to the entry and is renamed into place when it is complete, with a manifest
  (``fp8npu-model.json``: the simulator binary's size and SHA-256) written last;
* **locked**: builds of one key are serialized by an exclusive ``fcntl`` lock on
  ``<name>-<key>.lock``; a second process asking for the same model waits, then reuses the
  first one's build. Different keys build in parallel;
* **self-repairing**: an entry whose manifest is missing or unreadable, or whose binary is
  missing or does not match the manifest, is moved aside and rebuilt, with one line on stderr
  saying so. Folders left by killed builds are removed by the next build of that key (the lock
  proves nobody is still using them).

The lock is released by the kernel when its holder dies, so a killed build never blocks the
next one.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

__all__ = ["CacheError", "MANIFEST", "cache_root", "cached_model", "entry_problem"]

#: Name of the manifest file inside an entry (written last, so its presence means complete).
MANIFEST = "fp8npu-model.json"
_FORMAT = 1


class CacheError(RuntimeError):
    """The cache folder cannot be used; the message says which folder and why."""


def cache_root():
    """Where built models are kept: ``$FP8NPU_CACHE`` or ``~/.cache/fp8npu``.

    Raises :class:`CacheError` when that path exists and is not a folder."""
    env = os.environ.get("FP8NPU_CACHE")
    origin = "FP8NPU_CACHE" if env else "the default cache"
    try:
        root = Path(env).expanduser() if env else Path.home() / ".cache" / "fp8npu"
    except RuntimeError:         # ~user of an unknown user, or no home folder
        raise CacheError(f"{origin} names a home folder that cannot be found ({env or '~'}); "
                         f"set FP8NPU_CACHE to a folder fp8npu may write to") from None
    try:
        exists, is_dir = root.exists(), root.is_dir()
    except (OSError, ValueError) as exc:
        raise CacheError(f"{origin} cannot be used ({getattr(exc, 'strerror', None) or exc}); "
                         f"set FP8NPU_CACHE to a folder fp8npu may write to") from None
    if exists and not is_dir:
        raise CacheError(f"{origin} points at {str(root)!r}, which is not a folder; "
                         f"set FP8NPU_CACHE to a folder fp8npu may write to")
    return root


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def entry_problem(entry, binary_name):
    """Why the cache entry folder ``entry`` cannot be used (one phrase), or None if it is whole."""
    if not entry.exists():
        return "missing"
    manifest = entry / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError:
        return "its manifest is missing (an interrupted build?)"
    except (OSError, ValueError):
        return "its manifest is unreadable"
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("binary") != binary_name:
        return "its manifest is not one this version of fp8npu wrote"
    binary = entry / binary_name
    try:
        size = binary.stat().st_size
    except OSError:
        return "its simulator binary is missing"
    if size != data.get("size") or _sha256(binary) != data.get("sha256"):
        return "its simulator binary does not match the manifest (changed or truncated)"
    return None


def _mkdir(path):
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the model cache folder {str(path)!r}: {exc.strerror or exc}; "
                         f"set FP8NPU_CACHE to a folder fp8npu may write to") from None


@contextlib.contextmanager
def _locked(lock_path, what, notify):
    """Hold an exclusive lock on ``lock_path``; say once that we wait if someone else holds it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise CacheError(f"cannot create the lock file {str(lock_path)!r}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            notify(f"waiting for another process that is building {what}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)     # releases the lock


def _remove(path):
    """Delete a folder: rename it out of the way first, so a half-deleted entry is never seen."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.rename(trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _stderr(message):
    print(f"fp8npu: {message}", file=sys.stderr, flush=True)


def cached_model(name, key, binary_name, build, notify=_stderr):
    """The folder of the complete cached model ``name``/``key``, building it if needed.

    ``build(folder)`` must build the model into the empty private ``folder`` (leaving
    ``binary_name`` there) or raise; the folder is removed if it raises. Returns the entry
    :class:`~pathlib.Path`. ``notify`` receives one-line messages (waiting for another build,
    rebuilding a broken entry).
    """
    rtl = cache_root() / "rtl"
    entry = rtl / f"{name}-{key}"
    try:
        whole = entry_problem(entry, binary_name) is None
    except OSError as exc:
        raise CacheError(f"the model cache folder {str(rtl)!r} cannot be used: {exc.strerror or exc}") from None
    if whole:
        return entry
    _mkdir(rtl)
    with _locked(rtl / f"{name}-{key}.lock", f"the model {name}", notify):
        problem = entry_problem(entry, binary_name)
        if problem is None:               # another process built it while we waited
            return entry
        # the lock is ours: every private build folder of this key is left over from a killed build
        for stale in rtl.glob(f".build-{name}-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if problem != "missing":
            notify(f"the cached model {entry} is broken ({problem}); rebuilding it")
            _remove(entry)
        work = rtl / f".build-{name}-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        work.mkdir()
        try:
            build(work)
            binary = work / binary_name
            if not binary.is_file():
                raise CacheError(f"the build of {name} produced no simulator binary {binary_name!r}")
            manifest = {"format": _FORMAT, "binary": binary_name, "size": binary.stat().st_size,
                        "sha256": _sha256(binary), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            os.rename(work, entry)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return entry
