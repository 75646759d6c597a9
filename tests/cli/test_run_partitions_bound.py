"""`dlm run PIPELINE --partitions K` refuses a K no run could use: each partition plans the
whole catalogue, so `--partitions 100000` meant 100000 plans (or sub-runs) for one run."""

from __future__ import annotations

from pathlib import Path

from lifecycle.planning.partition import MAX_PARTITIONS


def test_too_many_partitions_is_one_line_and_starts_nothing(dlm, db_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for pipeline in ("replicate", "verify"):
        r = dlm("run", pipeline, "--partitions", str(MAX_PARTITIONS + 1))
        assert r.code == 2, (pipeline, r.out, r.err)
        assert r.err.startswith("dlm: error: ") and r.err.count("\n") == 1, r.err
        assert f"at most {MAX_PARTITIONS}" in r.err and r.out == ""
