"""The link guard: refuse root-relative paths that are, or go through, a symbolic link on a local root.

DLM never reads, writes or deletes through a link below a storage root (the root itself may be
a link: its real path is the root). A path is checked with one `lstat` per component, and the
directories already checked are cached, so a batch of files in a few directories costs about
one `lstat` per file. Paths are plain relative names (no '.', '..' or empty segment), so a path
without a link cannot leave its root.

The check is a snapshot: a link planted between the check and the use is not seen (see
docs/design-notes.md, "No links, no escape").
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

_DIR, _ABSENT, _LINK = "dir", "absent", "link"
_NOT_PLAIN = frozenset(("", ".", ".."))  # path segments that are not a plain name


class LinkGuard:
    """Checks paths under one local root; remembers the directories it has looked at."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(root)
        self._dirs: dict[str, str] = {}

    def _dir_state(self, rel: str) -> str:
        state = self._dirs.get(rel)
        if state is None:
            try:
                mode = os.lstat(os.path.join(self.root, rel)).st_mode
            except OSError:  # absent, a file in the way, unreadable: nothing below it to follow
                state = _ABSENT
            else:
                if stat.S_ISLNK(mode):
                    state = _LINK
                elif stat.S_ISDIR(mode):
                    state = _DIR
                else:
                    state = _ABSENT
            self._dirs[rel] = state
        return state

    def why_refused(self, path: str, *, one_name: bool = False) -> str | None:
        """None if `path` (relative to the root) may be used; else why not, to follow the path
        in a message ("is a symbolic link", "goes through a symbolic link ('run')"). With
        `one_name`, a file with other names (a hard link: not a copy of its own) is refused too."""
        parts = path.split("/")
        if path.startswith("/") or not _NOT_PLAIN.isdisjoint(parts):
            return "is not a plain path inside the root"
        prefix = ""
        for part in parts[:-1]:
            prefix = f"{prefix}/{part}" if prefix else part
            state = self._dir_state(prefix)
            if state == _LINK:
                return f"goes through a symbolic link ({prefix!r})"
            if state == _ABSENT:
                return None  # nothing exists below: nothing to follow
        try:
            st = os.lstat(os.path.join(self.root, path))
        except OSError:
            return None
        if one_name and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            return f"is a hard link shared with another file ({st.st_nlink} names, one physical copy)"
        return "is a symbolic link" if stat.S_ISLNK(st.st_mode) else None

    def refused(self, paths: Iterable[str]) -> dict[str, str]:
        """path -> why it is refused, for the paths that are refused."""
        out: dict[str, str] = {}
        for path in paths:
            why = self.why_refused(path)
            if why is not None:
                out[path] = why
        return out


def refused_paths(root: str | os.PathLike[str], paths: Iterable[str]) -> dict[str, str]:
    """path -> reason for each of `paths` (relative to the local `root`) that is, or goes
    through, a symbolic link, or is not a plain relative path. Raises nothing."""
    return LinkGuard(root).refused(paths)
