"""The bad-input corpus (DESIGN.md section 7): every wrong input gets exactly one line on stderr,
`dlm: error: ...` naming what is wrong, a non-zero exit, no traceback, and changes nothing.

"Nothing" is checked, not assumed: around every case the test takes a sha256 over every row
of every catalogue table (ordered by primary key) and a digest of every file on the storages
and in the source directory, and compares them. Each case runs on SQLite and on PostgreSQL,
against the module's estate (see conftest.py); the S3 cases add an S3 storage on the real
SeaweedFS server, the rclone cases run the real rclone binary.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from lifecycle.checksum import checksum_file as real_checksum_file
from tests.bad_input.conftest import Estate, FifoGuard, Result, snapshot


def assert_refused(r: Result, message: str) -> None:
    """One line, `dlm: error: ` first, naming `message`; a non-zero exit; no traceback."""
    assert r.code != 0, f"exit 0 for bad input; stdout: {r.out[:500]!r}"
    assert r.err.startswith("dlm: error: "), r.err[:2000]
    assert r.err.count("\n") == 1 and r.err.endswith("\n"), r.err[:2000]
    assert "Traceback" not in r.err + r.out, r.err[:2000]
    assert "internal error" not in r.err, r.err
    assert message.lower() in r.err.lower(), f"{message!r} not in {r.err!r}"


@contextmanager
def unchanged(estate: Estate) -> Iterator[None]:
    """The catalogue (every table, every row) and every storage's files are as they were."""
    before = snapshot(estate)
    yield
    after = snapshot(estate)
    assert after["catalogue"] == before["catalogue"], "the catalogue changed"
    assert after["files"] == before["files"], "files on a storage (or a source) changed"
    assert after["bucket"] == before["bucket"], "objects in the S3 bucket changed"


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {base} {src} {a} {b} {meta} {lists} {closed} {endpoint} {bucket} {key}
    message: str  # what the error line must name
    s3: bool = False

    def args(self, paths: dict[str, str]) -> list[str]:
        return [a.format(**paths) if "{" in a else a for a in self.argv]


def upload_as(name: str) -> tuple[str, ...]:
    return ("ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--name", name)


def upload_with(*extra: str) -> tuple[str, ...]:
    return ("ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--name", "new.dat", *extra)


def where(text: str) -> tuple[str, ...]:
    return ("items", "list", "--where", text)


def add_storage(name: str, kind: str, root: str, *extra: str) -> tuple[str, ...]:
    return ("storage", "add", name, "--kind", kind, "--root", root, *extra)


def add_s3(root: str, endpoint: str, prefix: str) -> tuple[str, ...]:
    return add_storage("s3-new", "s3", root, "--endpoint", endpoint, "--credentials-env", prefix)


CASES = [
    # ------------------------------------------------------------------ names
    Case("name-dotdot", upload_as(".."), "invalid item name"),
    Case("name-dotdot-inside", upload_as("a/../b"), "'..'"),
    Case("name-dot-segment", upload_as("./a"), "'.'"),
    Case("name-absolute", upload_as("/etc/passwd"), "absolute"),
    Case("name-nul", upload_as("a\x00b"), "U+0000"),
    Case("name-newline", upload_as("a\nb"), "U+000A"),
    Case("name-tab", upload_as("a\tb"), "U+0009"),
    Case("name-escape-sequence", upload_as("a\x1b[31mred"), "U+001B"),
    Case("name-delete-char", upload_as("a\x7fb"), "U+007F"),
    Case("name-c1-control", upload_as("a\x85b"), "U+0085"),
    Case("name-10kb", upload_as("n" * 10240), "longer than 1024"),
    Case("name-300-char-segment", upload_as("dir/" + "s" * 300), "longer than 255"),
    Case("name-not-nfc", upload_as("cafe\u0301.dat"), "NFC"),
    Case("name-zero-width-joiner", upload_as("a\u200db.dat"), "U+200D"),
    Case("name-zero-width-space", upload_as("a\u200b.dat"), "U+200B"),
    Case("name-rtl-override", upload_as("report\u202etxt.exe"), "U+202E"),
    Case("name-fullwidth-solidus", upload_as("a\uff0fb.dat"), "U+FF0F"),
    Case("name-division-slash", upload_as("a\u2215b.dat"), "U+2215"),
    Case("name-fullwidth-dotdot", upload_as("\uff0e\uff0e/x.dat"), "U+FF0E"),
    Case("name-undecodable-byte", upload_as("a\udcffb"), "U+DCFF"),
    Case("name-empty", upload_as(""), "empty"),
    Case("name-trailing-slash", upload_as("dir/"), "empty path segments"),
    Case("name-double-slash", upload_as("a//b"), "empty path segments"),
    Case("name-backslash", upload_as("a\\b"), "backslash"),
    # ------------------------------------------------------------------ filters
    Case("filter-sql-injection", where("name='x' or 1=1; drop table item"), "invalid filter"),
    Case("filter-semicolon", where("name = 'x'; drop table item"), "a filter is one expression"),
    Case("filter-unbalanced-open", where("(name = 'x'"), "expected ')'"),
    Case("filter-unbalanced-close", where("name = 'x')"), "unbalanced ')'"),
    Case("filter-unknown-field", where("colour = 'red'"), "unknown field 'colour'"),
    Case("filter-size-not-a-size", where("size > 'abc'"), "'size' needs"),
    Case("filter-created-not-a-date", where("created > 12"), "'created' needs a date"),
    Case("filter-unknown-state", where("state = 'NOPE'"), "unknown state 'NOPE'"),
    Case("filter-empty", where(""), "empty filter"),
    Case("filter-blank", where("   "), "empty filter"),
    Case("filter-5000-chars", where("name = '" + "x" * 4990 + "'"), "longer than 4096"),
    Case("filter-deep-parens", where("(" * 60 + "name = 'x'" + ")" * 60), "nested deeper than 50"),
    Case("filter-deep-not", where("not " * 500 + "name = 'x'"), "nested deeper than 50"),
    Case("filter-unterminated-string", where("name = 'x"), "unterminated"),
    Case("filter-no-value", where("size >"), "expected a value"),
    Case("filter-nul", where("name = 'a\x00b'"), "invalid character"),
    Case("filter-huge-number", where("size > 99999999999999999999999"), "out of range"),
    Case("dataset-bad-filter", ("datasets", "create", "d", "--where", "size >"), "invalid filter"),
    Case("dataset-empty-filter", ("datasets", "create", "d", "--where", ""), "empty filter"),
    Case("dataset-bad-name", ("datasets", "create", "Bad Name", "--where", "size > 1"), "dataset name"),
    Case("dataset-duplicate", ("datasets", "create", "raw", "--where", "size > 1"), "already exists"),
    # ------------------------------------------------------------------ metadata
    Case("meta-invalid-json", upload_with("--meta-json", "{meta}/bad.json"), "not valid JSON"),
    Case("meta-array", upload_with("--meta-json", "{meta}/array.json"), "JSON object"),
    Case("meta-string", upload_with("--meta-json", "{meta}/string.json"), "JSON object"),
    Case("meta-number", upload_with("--meta-json", "{meta}/number.json"), "JSON object"),
    Case("meta-null", upload_with("--meta-json", "{meta}/null.json"), "JSON object"),
    Case("meta-over-1mib", upload_with("--meta-json", "{meta}/huge.json"), "larger than 1 MiB"),
    Case("meta-nan", upload_with("--meta-json", "{meta}/nan.json"), "NaN"),
    Case("meta-infinity", upload_with("--meta-json", "{meta}/infinity.json"), "Infinity"),
    Case("meta-nested-100k-deep", upload_with("--meta-json", "{meta}/deep.json"), "nested"),
    Case("meta-nul-in-text", upload_with("--meta-json", "{meta}/nul.json"), "U+0000"),
    Case("meta-lone-surrogate", upload_with("--meta-json", "{meta}/surrogate.json"), "U+D800"),
    Case("meta-not-utf8", upload_with("--meta-json", "{meta}/latin1.json"), "not valid JSON"),
    Case("meta-json-missing", upload_with("--meta-json", "{meta}/nope.json"), "cannot read --meta-json"),
    Case("meta-json-directory", upload_with("--meta-json", "{meta}"), "cannot read --meta-json"),
    Case("meta-empty-key", upload_with("--meta", "=x"), "invalid --meta '=x'"),
    Case("meta-no-value", upload_with("--meta", "novalue"), "invalid --meta 'novalue'"),
    Case("meta-key-with-spaces", upload_with("--meta", "key with spaces=1"), "invalid --meta"),
    Case("meta-nul-in-value", upload_with("--meta", "k=a\x00b"), "U+0000"),
    # ------------------------------------------------------------------ storages
    Case("storage-unknown", ("ingest", "-s", "nope", "--upload", "{src}/f0.dat"), "unknown storage 'nope'"),
    Case("storage-show-unknown", ("storage", "show", "nope"), "unknown storage 'nope'"),
    Case("storage-drain-unknown", ("storage", "drain", "nope"), "unknown storage 'nope'"),
    Case("storage-retire-live", ("storage", "retire", "disk-a"), "still holds"),
    Case("storage-duplicate", add_storage("disk-a", "posix", "{a}"), "already exists"),
    Case(
        "storage-duplicate-of-s3",
        add_storage("s3-a", "posix", "{b}"),
        "storage 's3-a' already exists",
        s3=True,
    ),
    Case("s3-unreachable-endpoint", add_s3("{bucket}", "{closed}", "CORPUS_S3"), "unreachable", s3=True),
    Case(
        "s3-wrong-secret",
        add_s3("{bucket}", "{endpoint}", "CORPUS_WRONG"),
        "rejected the credentials",
        s3=True,
    ),
    Case(
        "s3-missing-credentials",
        add_s3("{bucket}", "{endpoint}", "CORPUS_NOSUCH"),
        "CORPUS_NOSUCH_ACCESS_KEY_ID",
        s3=True,
    ),
    Case(
        "s3-bucket-missing",
        add_s3("no-such-bucket-corpus", "{endpoint}", "CORPUS_S3"),
        "bucket 'no-such-bucket-corpus' does not exist",
        s3=True,
    ),
    Case(
        "s3-bad-bucket-name",
        add_s3("Bad_Bucket", "{endpoint}", "CORPUS_S3"),
        "invalid S3 bucket name",
        s3=True,
    ),
    Case(
        "s3-bad-credentials-env", add_s3("{bucket}", "{endpoint}", "lower case"), "credentials env", s3=True
    ),
    Case("posix-root-missing", add_storage("new", "posix", "{base}/does-not-exist"), "does not exist"),
    Case("posix-root-is-a-file", add_storage("new", "posix", "{base}/afile"), "not a directory"),
    Case("posix-root-of-another", add_storage("new", "posix", "{a}"), "same as the root"),
    Case("posix-root-inside-another", add_storage("new", "posix", "{a}/run"), "lies inside the root"),
    Case("posix-root-containing-others", add_storage("new", "posix", "{base}"), "contains the root"),
    Case("posix-root-whole-fs", add_storage("new", "posix", "/"), "whole file system"),
    Case(
        "posix-with-endpoint",
        add_storage("new", "posix", "{b}", "--endpoint", "http://x"),
        "s3 storages only",
    ),
    Case("rclone-root-no-remote", add_storage("new", "rclone", "noremote"), "REMOTE:PATH"),
    Case("rclone-unknown-remote", add_storage("new", "rclone", "nosuchremote:data"), "nosuchremote"),
    Case(
        "capacity-negative", add_storage("new", "posix", "{b}", "--capacity", "-5GiB"), "invalid size '-5GiB'"
    ),
    Case("capacity-words", add_storage("new", "posix", "{b}", "--capacity", "lots"), "invalid size 'lots'"),
    Case("capacity-zero", add_storage("new", "posix", "{b}", "--capacity", "0"), "capacity must be positive"),
    Case("capacity-empty", add_storage("new", "posix", "{b}", "--capacity", ""), "invalid size ''"),
    Case("capacity-overflow", add_storage("new", "posix", "{b}", "--capacity", "99999999PiB"), "too large"),
    Case("tier-unknown", add_storage("new", "posix", "{b}", "--tier", "lukewarm"), "invalid tier 'lukewarm'"),
    Case("kind-unknown", add_storage("new", "ftp", "{b}"), "invalid storage kind 'ftp'"),
    Case("kind-memory", add_storage("new", "memory", "{b}"), "unit tests only"),
    Case("storage-name-spaces", add_storage("Bad Name", "posix", "{b}"), "invalid storage name 'Bad Name'"),
    Case("storage-name-100-chars", add_storage("s" * 100, "posix", "{b}"), "at most 64 characters"),
    Case("storage-name-empty", add_storage("", "posix", "{b}"), "invalid storage name"),
    # ------------------------------------------------------------------ phases and lifetimes
    Case("phase-unknown", upload_with("--phase", "PLASMAX"), "invalid phase 'PLASMAX'"),
    Case("phase-lowercase-typo", upload_with("--phase", "liqiud"), "invalid phase 'liqiud'"),
    Case("set-phase-typo", ("items", "set-phase", "run/f0.dat", "sollid"), "invalid phase 'sollid'"),
    Case("lifetime-negative", upload_with("--lifetime", "-3d"), "invalid lifetime '-3d'"),
    Case("lifetime-zero", upload_with("--lifetime", "0d"), "greater than zero"),
    Case("lifetime-overflow", upload_with("--lifetime", "99999999999y"), "1000 years"),
    Case("lifetime-junk", upload_with("--lifetime", "30 days"), "invalid lifetime '30 days'"),
    Case("lifetime-empty", upload_with("--lifetime", ""), "invalid lifetime ''"),
    Case(
        "set-expiry-lifetime-junk",
        ("items", "set-expiry", "run/f0.dat", "--lifetime", "1.5d"),
        "invalid lifetime",
    ),
    Case(
        "at-not-a-date", ("items", "set-expiry", "run/f0.dat", "--at", "tomorrow"), "invalid date 'tomorrow'"
    ),
    Case("at-impossible-date", ("items", "set-expiry", "run/f0.dat", "--at", "2026-02-30"), "invalid date"),
    Case("at-empty", ("items", "set-expiry", "run/f0.dat", "--at", ""), "invalid date ''"),
    # ------------------------------------------------------------------ ingest
    Case("ingest-no-storage", ("ingest", "--upload", "{src}/f0.dat"), "--storage is required"),
    Case("ingest-nothing", ("ingest", "-s", "disk-a"), "nothing to ingest"),
    Case(
        "ingest-missing-local-file",
        ("ingest", "-s", "disk-a", "--upload", "{src}/missing.dat"),
        "no such file",
    ),
    Case("ingest-empty-directory", ("ingest", "-s", "disk-a", "--upload", "{base}/empty"), "holds no files"),
    Case("ingest-fifo-in-place", ("ingest", "-s", "disk-a", "{a}/pipe"), "not a file"),
    Case("ingest-outside-root", ("ingest", "-s", "disk-a", "{base}/outside.dat"), "outside storage"),
    Case("ingest-dotdot-relative", ("ingest", "-s", "disk-a", "../outside.dat"), "not inside storage"),
    Case("ingest-symlink-escape", ("ingest", "-s", "disk-a", "{a}/evil-link.dat"), "outside storage"),
    Case("ingest-symlinked-dir-escape", ("ingest", "-s", "disk-a", "evil-dir/secret.dat"), "outside storage"),
    Case("ingest-missing-in-place", ("ingest", "-s", "disk-a", "nothere.dat"), "'nothere.dat' not found"),
    Case("ingest-already-registered", ("ingest", "-s", "disk-b", "obs/a.fits"), "already registered"),
    Case(
        "ingest-name-given-twice",
        ("ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "{src}/other/f0.dat"),
        "given twice",
    ),
    Case(
        "ingest-name-with-several-paths",
        ("ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "{src}/f1.dat", "--name", "x.dat"),
        "single path",
    ),
    Case(
        "ingest-second-path-missing",
        ("ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "{src}/missing.dat"),
        "no such file",
    ),
    Case(
        "from-list-bad-name-line-4",
        ("ingest", "-s", "disk-a", "--from-list", "{lists}/bad-name.jsonl"),
        "bad-name.jsonl line 4",
    ),
    Case(
        "from-list-bad-size-line-3",
        ("ingest", "-s", "disk-a", "--from-list", "{lists}/bad-size.csv"),
        "bad-size.csv line 3",
    ),
    Case(
        "from-list-bad-json-line-3",
        ("ingest", "-s", "disk-a", "--from-list", "{lists}/bad-json.jsonl"),
        "bad-json.jsonl line 3",
    ),
    Case(
        "from-list-bad-phase-line-2",
        ("ingest", "-s", "disk-a", "--from-list", "{lists}/bad-phase.jsonl"),
        "bad-phase.jsonl line 2",
    ),
    Case(
        "from-list-missing", ("ingest", "-s", "disk-a", "--from-list", "{lists}/nope.jsonl"), "does not exist"
    ),
    Case(
        "from-list-with-paths",
        ("ingest", "-s", "disk-a", "--from-list", "{lists}/bad-name.jsonl", "x.dat"),
        "takes no paths",
    ),
    # ------------------------------------------------------------------ items and checkout
    Case("item-unknown", ("items", "show", "nothing-here"), "no item 'nothing-here'"),
    Case("item-unknown-version", ("items", "show", "run/f0.dat@v9"), "no item 'run/f0.dat@v9'"),
    Case("set-phase-unknown-item", ("items", "set-phase", "nothing-here", "GAS"), "no item"),
    Case("set-expiry-unknown-item", ("items", "set-expiry", "nothing-here", "--never"), "no item"),
    Case(
        "set-expiry-at-and-lifetime",
        ("items", "set-expiry", "run/f0.dat", "--at", "2030-01-01", "--lifetime", "30d"),
        "exactly one",
    ),
    Case("set-expiry-nothing", ("items", "set-expiry", "run/f0.dat"), "exactly one"),
    Case("set-phase-deleted-item", ("items", "set-phase", "gone.dat", "SOLID"), "DELETED"),
    Case("set-expiry-deleted-item", ("items", "set-expiry", "gone.dat", "--lifetime", "30d"), "DELETED"),
    Case(
        "checkout-unknown-dataset", ("checkout", "--dataset", "nope", "{base}/out"), "unknown dataset 'nope'"
    ),
    Case("checkout-unknown-item", ("checkout", "nothing-here", "{base}/out"), "no item 'nothing-here'"),
    Case("checkout-dest-is-a-file", ("checkout", "run/f0.dat", "{base}/afile"), "not a directory"),
    Case("checkout-into-a-storage", ("checkout", "run/f0.dat", "{a}"), "outside every storage"),
    Case("checkout-deleted-item", ("checkout", "gone.dat", "{base}/out"), "gone.dat"),
    Case(
        "checkout-items-and-dataset", ("checkout", "run/f0.dat", "--dataset", "raw", "{base}/out"), "not both"
    ),
    Case("dataset-show-unknown", ("datasets", "show", "nope"), "unknown dataset 'nope'"),
    Case("dataset-delete-unknown", ("datasets", "delete", "nope"), "unknown dataset 'nope'"),
    Case("run-unknown-pipeline", ("run", "nope"), "unknown pipeline 'nope'"),
    Case("unknown-command", ("frobnicate",), "no such command"),
    Case("items-list-limit-zero", ("items", "list", "--limit", "0"), "--limit"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(
    case: Case, estate: Estate, dlm, request: pytest.FixtureRequest
) -> None:
    if case.s3:
        request.getfixturevalue("s3_estate")
        request.getfixturevalue("_estate_env")
    with unchanged(estate):
        r = dlm(*case.args(estate.paths))
    assert_refused(r, case.message)
    assert not (estate.base / "out").exists(), "a failed checkout created its destination"


def test_unique_case_ids() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 40


# --------------------------------------------------------------------------- cases that need more setup


def test_upload_of_a_fifo_is_refused(estate: Estate, dlm) -> None:
    """A FIFO is no file to upload: refused up front, not read (a guard feeds it so a bug cannot hang)."""
    with FifoGuard(estate.base / "pipe"), unchanged(estate):
        r = dlm("ingest", "-s", "disk-a", "--upload", str(estate.base / "pipe"), "--name", "pipe.dat")
    assert_refused(r, "not a regular file")


def test_file_that_grows_while_checksummed_is_refused(
    estate: Estate, dlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registering in place a file that a writer appends to while DLM reads it.

    A real background writer races the checksum (small files are read before it starts), so the
    growth is made deterministic: the posix backend's checksum appends to the file, then reads it.
    """
    target = estate.base / "disk-a" / "growing.dat"
    target.write_bytes(b"G" * 10_000)

    def grows_then_reads(path: Path, algo: str) -> tuple[str, int]:
        with open(path, "ab") as f:
            f.write(b"more data from a writer that is not finished\n")
        return real_checksum_file(path, algo)

    monkeypatch.setattr("lifecycle.storage.posix.checksum_file", grows_then_reads)
    try:
        with unchanged(estate):
            before_size = target.stat().st_size
            r = dlm("ingest", "-s", "disk-a", str(target))
            # the file is the writer's, not DLM's: DLM must neither register nor remove it
            assert target.stat().st_size > before_size
            target.write_bytes(b"G" * 10_000)  # put it back as it was so the digest can compare
        assert_refused(r, "changed while it was read")
    finally:
        target.unlink()


def test_file_a_background_writer_appends_to_is_refused(estate: Estate, dlm) -> None:
    """The real race: a thread appends to a 16 MiB file every millisecond while DLM checksums it.

    Reading 16 MiB takes tens of milliseconds, so the size and mtime DLM sees before and after
    the read differ; the test above makes the same refusal deterministic.
    """
    target = estate.base / "disk-a" / "live.dat"
    before = snapshot(estate)
    target.write_bytes(os.urandom(16 * 1024 * 1024))
    stop = threading.Event()

    def writer() -> None:
        with open(target, "ab", buffering=0) as f:
            while not stop.is_set():
                f.write(b"x" * 512)
                time.sleep(0.001)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(0.01)
        r = dlm("ingest", "-s", "disk-a", str(target))
    finally:
        stop.set()
        thread.join(timeout=5)
        target.unlink()
    assert_refused(r, "changed while it was read")
    assert snapshot(estate) == before


def test_local_file_that_grows_during_upload_leaves_no_stray_copy(
    estate: Estate, dlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source grows between checksum and copy: refused, and the copy on the storage removed."""
    src = estate.base / "growing-src.dat"
    src.write_bytes(b"S" * 5000)

    def reads_then_grows(path: Path, algo: str) -> tuple[str, int]:
        result = real_checksum_file(path, algo)
        with open(path, "ab") as f:
            f.write(b"appended after the checksum\n")
        return result

    monkeypatch.setattr("lifecycle.catalog.checksum_file", reads_then_grows)
    try:
        with unchanged(estate):
            r = dlm("ingest", "-s", "disk-a", "--upload", str(src), "--name", "grown.dat")
        assert_refused(r, "changed while it was uploaded")
    finally:
        src.unlink()


def test_upload_to_s3_with_a_wrong_secret_leaves_no_object(
    s3_estate: Estate, dlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORPUS_S3_SECRET_ACCESS_KEY", "not-the-secret")
    with unchanged(s3_estate):
        r = dlm(
            "ingest", "-s", "s3-a", "--upload", str(s3_estate.base / "src" / "f0.dat"), "--name", "up.dat"
        )
    assert_refused(r, "rejected the credentials")


def test_upload_to_s3_without_credentials_leaves_no_object(
    s3_estate: Estate, dlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CORPUS_S3_ACCESS_KEY_ID")
    with unchanged(s3_estate):
        r = dlm(
            "ingest", "-s", "s3-a", "--upload", str(s3_estate.base / "src" / "f0.dat"), "--name", "up.dat"
        )
    assert_refused(r, "set CORPUS_S3_ACCESS_KEY_ID")


def test_second_upload_failing_removes_the_first(
    estate: Estate, dlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two files; the second's copy fails on the storage: the first, already written, is removed."""
    from lifecycle.errors import StorageError
    from lifecycle.storage.posix import PosixStorage

    real_put = PosixStorage.put
    calls = []

    def put_fails_second_time(self, path, src, *, metadata=None):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 2:
            raise StorageError(f"storage '{self.name}': cannot write {path!r}: No space left on device")
        return real_put(self, path, src, metadata=metadata)

    monkeypatch.setattr(PosixStorage, "put", put_fails_second_time)
    src = estate.base / "src"
    with unchanged(estate):
        r = dlm("ingest", "-s", "disk-a", "--upload", str(src / "f1.dat"), str(src / "f2.dat"))
    assert_refused(r, "No space left on device")
    assert len(calls) == 2
