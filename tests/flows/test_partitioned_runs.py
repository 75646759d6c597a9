"""`dlm run replicate|verify --partitions K` through the real CLI: without a deployment the K
partitions run one after another in the `dlm` process, each acting on the items whose oid is
its number modulo K, so every item is copied once and every copy read once."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from lifecycle.planning.partition import in_partition
from lifecycle.reports import PartitionedReport, PipelineReport, VerifyReport
from tests.flows.dlm_process import dlm, dlm_env, files, run_json

pytestmark = [pytest.mark.prefect, pytest.mark.rclone]

K = 3
N = 12


@pytest.fixture
def estate(tmp_path: Path, flows_env: None) -> dict[str, Any]:
    """Posix storages 'a' and 'b', N LIQUID items uploaded to 'a' (one `dlm ingest`)."""
    from prefect.settings import PREFECT_API_URL

    env = dlm_env(
        tmp_path / "home", PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_HOME=str(tmp_path / "ph")
    )
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        res = dlm(env, "storage", "add", name, "--kind", "posix", "--root", str(tmp_path / name))
        assert res.returncode == 0, res.stderr
    staging = tmp_path / "in"
    staging.mkdir()
    payloads = {f"f{i:02d}.bin": os.urandom(3000) for i in range(N)}
    for name, data in payloads.items():
        (staging / name).write_bytes(data)
    res = dlm(env, "ingest", "--storage", "a", "--upload", "--phase", "LIQUID", *map(str, staging.iterdir()))
    assert res.returncode == 0, res.stderr
    listed = dlm(env, "items", "list", "--json")
    oids = {row["name"].rsplit("/", 1)[-1]: uuid.UUID(row["oid"]) for row in json.loads(listed.stdout)}
    assert sorted(oids) == sorted(payloads)
    return {"env": env, "a": tmp_path / "a", "b": tmp_path / "b", "payloads": payloads, "oids": oids}


def _share(estate: dict[str, Any], i: int) -> set[str]:
    """The names of the items in partition i."""
    return {n for n, oid in estate["oids"].items() if in_partition(oid, K, i)}


def test_partitioned_replicate_then_verify_from_the_cli(estate: dict[str, Any]) -> None:
    env, b = estate["env"], estate["b"]

    data, report = run_json(env, "replicate", "--partitions", str(K))

    assert isinstance(report, PartitionedReport) and data["partitions"] == K
    assert [r.partition for r in report.runs] == list(range(K))
    for run in report.runs:  # each partition copied its own items, and only those
        assert isinstance(run.report, PipelineReport) and run.flow_run is None
        assert run.report.failed == 0
        assert {Path(a.path).name for a in run.report.actions} == _share(estate, run.partition)
        assert run.report.copied == len(_share(estate, run.partition))
    assert len(files(b)) == N
    for path in files(b):  # every second copy holds its item's bytes
        assert (b / path).read_bytes() == estate["payloads"][Path(path).name]

    # one copy rots behind DLM's back
    rotten = files(b)[0]
    data_b = bytearray((b / rotten).read_bytes())
    data_b[100] ^= 0xFF
    (b / rotten).write_bytes(bytes(data_b))

    data, verified = run_json(env, "verify", "--partitions", str(K))

    assert isinstance(verified, PartitionedReport) and verified.pipeline == "verify"
    corrupted_in = []
    for run in verified.runs:
        rep = run.report
        assert isinstance(rep, VerifyReport)
        mine = _share(estate, run.partition)
        # each partition read both copies of its own items, each once: none twice, none left out
        assert rep.selected == 2 * len(mine) and (rep.intact or 0) + (rep.corrupted or 0) == rep.selected
        if rep.corrupted:
            corrupted_in.append((run.partition, rep.corrupted, rep.repaired))
    assert sum(r.report.selected for r in verified.runs if isinstance(r.report, VerifyReport)) == 2 * N
    owner = next(i for i in range(K) if Path(rotten).name in _share(estate, i))
    assert corrupted_in == [(owner, 1, 1)]  # found and repaired once, by its item's partition
    assert (b / rotten).read_bytes() == estate["payloads"][Path(rotten).name]

    shown = dlm(env, "run", "verify", "--partitions", str(K), "--budget", "1KiB")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"verify in {K} partitions")
    assert all(f"partition {i + 1} of {K}" in shown.stdout for i in range(K))


def test_zero_partitions_is_bad_input_in_one_line(tmp_path: Path) -> None:
    res = dlm(dlm_env(tmp_path / "home"), "run", "replicate", "--partitions", "0")
    assert res.returncode == 2 and res.stderr.startswith("dlm: error: ") and res.stderr.count("\n") == 1
    assert "--partitions" in res.stderr and not (tmp_path / "home" / "dlm.db").exists()
