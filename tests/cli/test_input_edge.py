"""Issue 8 at the CLI's edge: the reproductions of bad input, secrets and "internal error"
messages, run against real posix storages, real processes and real PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from devrig.postgres import fresh_postgres_database

REPO = Path(__file__).resolve().parents[2]


def _env(url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_") or k == "DLM_TEST_POSTGRES_URL"}
    env.update(DLM_DATABASE_URL=url, DLM_HOME=str(home), DLM_OWNER="tester", PYTHONPATH=str(REPO))
    return env


def test_three_concurrent_inits_on_a_fresh_postgres_all_succeed(tmp_path: Path) -> None:
    """Three real `dlm init` processes race on an empty database: the advisory lock serialises
    the migrations, so all three exit 0 and the schema is migrated once.

    To make the race certain rather than a matter of process start-up timing, the test holds an
    uncommitted CREATE TABLE alembic_version until all three processes wait on a lock, then
    rolls it back: they all go at once (without the lock, two fail on duplicate tables).
    """
    with fresh_postgres_database("dlm_init_race") as url:
        env = _env(url, tmp_path / "home")
        engine = sa.create_engine(sa.engine.make_url(url).set(drivername="postgresql+psycopg"))
        gate = engine.connect()
        try:
            gate.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "dlm.cli", "init"],
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(3)
            ]
            deadline = time.monotonic() + 90
            with engine.connect() as watch:
                while time.monotonic() < deadline:
                    waiting = watch.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                        )
                    ).scalar_one()
                    watch.rollback()
                    if waiting >= 3 or any(p.poll() is not None for p in procs):
                        break
                    time.sleep(0.1)
            assert waiting >= 3, "the three inits never all waited on the gate"
        finally:
            gate.rollback()
            gate.close()
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        try:
            for code, out, err in results:
                assert code == 0, err
                assert "catalogue ready" in out and err == ""
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
                assert conn.execute(sa.text("SELECT count(*) FROM item")).scalar_one() == 0
        finally:
            engine.dispose()


def test_init_prints_the_database_url_without_its_password(dlm, tmp_path: Path) -> None:
    with fresh_postgres_database("dlm_init_redact") as url:
        secret_url = (
            sa.engine.make_url(url)
            .set(password="pw-not-needed-by-trust")
            .render_as_string(hide_password=False)
        )
        os.environ["DLM_DATABASE_URL"] = secret_url
        try:
            r = dlm("init")
        finally:
            del os.environ["DLM_DATABASE_URL"]
    assert r.code == 0, r.err
    assert ":***@" in r.out
    assert "pw-not-needed" not in r.out + r.err


@pytest.fixture
def disks(dlm, db_url: str, tmp_path: Path) -> Path:
    for name in ("disk-a", "disk-b"):
        (tmp_path / name).mkdir()
        r = dlm("storage", "add", name, "--kind", "posix", "--root", str(tmp_path / name))
        assert r.code == 0, r.err
    return tmp_path


def test_name_with_version_separator_cannot_shadow_a_version(dlm, disks: Path) -> None:
    """Issue 8: `n@v2` was accepted as a name, and `items delete 'n@v2' --yes` then deleted
    version 2 of `n`. Now the name is refused everywhere it enters, and n v2 keeps its bytes."""
    src = disks / "src.dat"
    for payload in (b"version one", b"version two"):
        src.write_bytes(payload)
        assert dlm("ingest", "-s", "disk-a", "--upload", str(src), "--name", "n").code == 0
    v2 = json.loads(dlm("items", "show", "n@v2", "--json").out)
    v2_file = disks / "disk-a" / v2["replicas"][0]["path"]
    assert v2_file.read_bytes() == b"version two"

    src.write_bytes(b"an item the user wants to call n@v2")
    r = dlm("ingest", "-s", "disk-a", "--upload", str(src), "--name", "n@v2")
    assert r.code == 2 and "'@' is the version separator" in r.err
    (disks / "disk-a" / "n@v2").write_bytes(b"a file already on the storage")
    r = dlm("ingest", "-s", "disk-a", "n@v2")  # in place: the path would become the name
    assert r.code == 2 and "version separator" in r.err
    listing = disks / "list.jsonl"
    listing.write_text(json.dumps({"name": "n@v2", "path": "n@v2", "size": 29}) + "\n")
    r = dlm("ingest", "-s", "disk-a", "--from-list", str(listing))
    assert r.code == 2 and "list.jsonl line 1" in r.err

    # nothing took the name: n@v2 still means version 2 of n, whose bytes are intact
    shown = json.loads(dlm("items", "show", "n@v2", "--json").out)
    assert (shown["name"], shown["version"], shown["state"]) == ("n", 2, "READY")
    assert v2_file.read_bytes() == b"version two"
    names = {i["name"] for i in json.loads(dlm("items", "list", "--json").out)}
    assert names == {"n"}


def test_infinite_metadata_never_reaches_the_catalogue(dlm, disks: Path) -> None:
    """Issue 8: `--meta n=1.0e999` stored Infinity and broke every later meta. query."""
    src = disks / "src.dat"
    src.write_bytes(b"payload")
    r = dlm("ingest", "-s", "disk-a", "--upload", str(src), "--name", "x", "--meta", "n=1.0e999")
    assert r.code == 2 and "finite" in r.err
    assert dlm("ingest", "-s", "disk-a", "--upload", str(src), "--name", "y", "--meta", "n=1.5").code == 0
    r = dlm("items", "list", "--where", "meta.n > 1", "--json")
    assert r.code == 0, r.err
    assert [i["name"] for i in json.loads(r.out)] == ["y"]
    assert not (disks / "disk-a" / "x").exists()


def test_owner_and_metadata_keys_are_stored_in_nfc(dlm, disks: Path) -> None:
    src = disks / "src.dat"
    src.write_bytes(b"payload")
    meta = disks / "meta.json"
    meta.write_text(json.dumps({"cafe\u0301": 1}))
    r = dlm(
        "ingest", "-s", "disk-a", "--upload", str(src), "--name", "x", "--owner", "Jose\u0301",
        "--meta-json", str(meta),
    )  # fmt: skip
    assert r.code == 0, r.err
    shown = json.loads(dlm("items", "show", "x", "--json").out)
    assert shown["owner"] == "Jos\u00e9"
    assert shown["metadata"] == {"caf\u00e9": 1}


def _as_nobody() -> list[str]:
    """Run a command as an unprivileged user (root reads any file, so permission errors need one)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_unreadable_files_are_one_line_and_change_nothing(pg_db_url: str) -> None:
    """Issue 8: an unreadable file on ingest (in place, under an unreadable directory, and
    --upload) was an "internal error: PermissionError"; now one line, exit 1, nothing registered."""
    base = Path(tempfile.mkdtemp(prefix="dlm-unreadable-"))
    try:
        base.chmod(0o755)
        root = base / "disk"
        (root / "closed").mkdir(parents=True)
        (base / "home").mkdir()
        for p in (root, base / "home"):
            p.chmod(0o777)
        (root / "locked.dat").write_bytes(b"locked")
        (root / "locked.dat").chmod(0o000)
        (root / "closed" / "f.dat").write_bytes(b"closed")
        (root / "closed").chmod(0o000)
        (base / "local.dat").write_bytes(b"local")
        (base / "local.dat").chmod(0o000)
        env = _env(pg_db_url, base / "home")

        def dlm_cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*_as_nobody(), sys.executable, "-m", "dlm.cli", *args],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
            )  # fmt: skip

        assert dlm_cli("storage", "add", "disk", "--kind", "posix", "--root", str(root)).returncode == 0
        for args, shown in (
            (("locked.dat",), "locked.dat"),
            (("closed/f.dat",), "closed/f.dat"),
            (("--upload", str(base / "local.dat")), "local.dat"),
        ):
            r = dlm_cli("ingest", "-s", "disk", *args)
            assert r.returncode == 1, r.stderr
            assert r.stderr.startswith("dlm: error: ") and r.stderr.count("\n") == 1, r.stderr
            assert "Permission denied" in r.stderr and shown in r.stderr
            assert "internal error" not in r.stderr and "Traceback" not in r.stderr
        listed = dlm_cli("items", "list", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout) == []
        assert sorted(p.name for p in root.iterdir()) == [".dlm-storage", "closed", "locked.dat"]
    finally:
        for p in (base / "disk" / "closed", base / "disk" / "locked.dat", base / "local.dat"):
            if p.exists() or p.is_symlink():
                p.chmod(0o700)
        shutil.rmtree(base, ignore_errors=True)


def test_missing_storage_root_is_bad_input(dlm, db_url: str, tmp_path: Path) -> None:
    r = dlm("storage", "add", "gone", "--kind", "posix", "--root", str(tmp_path / "no-such-dir"))
    assert r.code == 2 and "does not exist" in r.err


def test_a_temporary_prefect_server_that_does_not_start_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several `dlm run` at once on a loaded machine: Prefect's temporary server times out.
    The user gets one line saying what to do, exit 1, not an internal error."""
    import dlm.cli as cli

    def app(**_kwargs: object) -> None:
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "replicate"])
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert err.count("\n") == 1 and err.startswith("dlm: error: Timed out"), err
    assert "dlm serve" in err and "internal error" not in err
