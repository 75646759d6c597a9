"""Summarise a py-spy collapsed-stack profile (`DLM_BENCH_PROFILE`, bench/helpers.profiled):
`python -m bench.profile_top FILE [--top N] [--thread NAME]`.

Prints, for one thread (main, unless --thread "other threads"), the functions that hold the most
wall-clock samples inclusively (idle waits counted: a wait on a subprocess or a server is where
the time goes), and those that hold them themselves, as shares of the thread's samples."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")
_REPO = str(Path(__file__).resolve().parents[1]) + "/"


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("/site-packages/", _REPO, "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def summarise(path: Path, top: int = 30, thread: str | None = None) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # the main thread's stacks start in runpy; a thread's in Thread._bootstrap
        name = "main" if frames[0].startswith("_run_module_as_main") else "other threads"
        threads[name] += n
        if name != (thread or "main"):
            continue
        total += n
        names = [_short(f) for f in frames]
        for s in set(names):  # a recursive function counts once per sample
            inclusive[s] += n
        own[names[-1]] += n
    lines = [
        f"{path.name}: {total} samples in thread {thread or 'main'}; threads: "
        + ", ".join(f"{t} {c}" for t, c in threads.most_common())
    ]
    lines.append("inclusive:")
    lines += [f"  {100 * c / max(total, 1):5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    lines.append("self:")
    lines += [f"  {100 * c / max(total, 1):5.1f}%  {f}" for f, c in own.most_common(top // 2)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--thread")
    a = ap.parse_args()
    print(summarise(a.file, a.top, a.thread))


if __name__ == "__main__":
    main()
