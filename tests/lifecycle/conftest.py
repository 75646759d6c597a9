"""Fixtures of the core tests: the in-process `dlm` CLI (for tests that set up as a user
does) and the three-storage estate the apply and integrity tests run on."""

from pathlib import Path

import pytest

from tests.cli.conftest import dlm  # noqa: F401
from tests.factories import Estate, three_tier_estate


@pytest.fixture
def estate(db_url: str, tmp_path: Path, s3_bucket: str, s3_env: object, rclone_path: str) -> Estate:
    """'hot' and 'warm' posix (site-a) and 'cold' S3 (site-b) on a real catalogue (SQLite, then
    PostgreSQL), the real SeaweedFS and rclone. Test files stage payloads in tmp_path/'staging'."""
    return three_tier_estate(tmp_path / "estate", server=s3_env, bucket=s3_bucket)
