"""`dlm token create/list/revoke` in a real process, and what the API then lets the token do."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from lifecycle.catalogue.db import get_engine
from tests.api.conftest import Api

ROOT = Path(__file__).resolve().parents[2]


def dlm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "dlm.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_a_token_from_the_cli_works_until_it_is_revoked(api: Api, db_url: str) -> None:
    made = dlm("token", "create", "--owner", "carol")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith("dlm_") and len(secret) > 40
    with api.client(secret) as carol:
        assert carol.get("/items").status_code == 200
        # the catalogue keeps its SHA-256 only, never the secret
        with get_engine(db_url).connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM token")).all()
        assert secret not in repr(rows)
        assert [r.secret_sha256 for r in rows] == [hashlib.sha256(secret.encode()).hexdigest()]
        listed = dlm("token", "list")
        assert listed.returncode == 0 and "carol" in listed.stdout and secret not in listed.stdout
        token_id = rows[0].id
        assert token_id in listed.stdout
        revoked = dlm("token", "revoke", token_id)
        assert revoked.returncode == 0, revoked.stderr
        assert carol.get("/items").status_code == 401


def test_bad_token_commands_say_so_in_one_line(db_url: str) -> None:
    for args, words in [
        (("token", "revoke", "zz"), "invalid token id"),
        (("token", "revoke", "0123456789ab"), "no token"),
        (("token", "create", "--owner", "bad\x1bname"), "--owner"),
    ]:
        res = dlm(*args)
        assert res.returncode == 2, (args, res.stderr)
        [line] = res.stderr.strip().splitlines()
        assert line.startswith("dlm: error: ") and words in line
