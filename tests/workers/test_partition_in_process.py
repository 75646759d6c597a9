"""A partitioned replicate called in-process (no deployment, as `dlm run` does): its partitions
run one after another in this process, and every item is still copied once."""

from __future__ import annotations

import pytest

from flows.pipelines import replicate
from lifecycle.reports import PartitionedReport
from tests.factories import Estate
from tests.workers.conftest import catalogue_copies, ingest

pytestmark = [pytest.mark.prefect, pytest.mark.postgres, pytest.mark.s3, pytest.mark.rclone]


def test_partitions_without_a_deployment_run_here_in_turn(estate: Estate, flows_env: None) -> None:
    names = ingest(estate, 30, prefix="here", size=1024)

    report = replicate(partitions=3)

    assert isinstance(report, PartitionedReport)
    assert report.partitions == 3
    copied = [r.report.copied if r.report else None for r in report.runs]
    # each partition copied its share (30 items leave one empty with odds of 1 in 65,000)
    assert all(c is not None and c > 0 for c in copied), copied
    assert sum(c or 0 for c in copied) == 30
    copies = catalogue_copies(estate, "here", 1024)
    assert set(copies.ready) == set(names)
    assert copies.copy_transfers == {n: 1 for n in names}


def test_a_partition_out_of_range_fails_the_run_in_one_line(estate: Estate, flows_env: None) -> None:
    from lifecycle.errors import InvalidValueError

    with pytest.raises(InvalidValueError, match=r"^partition must be in 0\.\.1, not 5$"):
        replicate(partitions=2, partition=5)
