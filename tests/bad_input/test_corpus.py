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
    code: int | None = None  # the exit code, where the case pins it (2: bad input, 1: a failure)

    def args(self, paths: dict[str, str]) -> list[str]:
        return [a.format(**paths) if "{" in a else a for a in self.argv]


def upload_as(name: str) -> tuple[str, ...]:
    return ("ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--name", name)


def from_list(name: str, *extra: str) -> tuple[str, ...]:
    return ("ingest", "-s", "disk-a", "--from-list", "{lists}/" + name, *extra)


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
    Case("ingest-symlink-in-root", ("ingest", "-s", "disk-a", "{a}/inner-link.dat"), "is a symbolic link"),
    Case(
        "ingest-through-linked-dir-inside-root",
        ("ingest", "-s", "disk-a", "run-alias/f0.dat"),
        "goes through a symbolic link ('run-alias')",
    ),
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
    # ------------------------------------------------------------------ issue 8: names
    Case("name-version-separator", upload_as("n@v2"), "'@' is the version separator", code=2),
    Case("name-version-separator-dir", upload_as("run@v1/f.dat"), "version separator", code=2),
    Case("name-only-spaces", upload_as("   "), "blank", code=2),
    Case("name-leading-space", upload_as(" a.dat"), "whitespace", code=2),
    Case("name-trailing-space", upload_as("a.dat "), "whitespace", code=2),
    Case("name-segment-trailing-space", upload_as("dir /a.dat"), "whitespace", code=2),
    Case("name-segment-only-spaces", upload_as("dir/  /a.dat"), "blank", code=2),
    Case("name-no-break-space-end", upload_as("a.dat\u00a0"), "whitespace", code=2),
    Case("name-400-byte-segment", upload_as("\u00e9" * 200), "255 bytes in UTF-8", code=2),
    Case("name-400-byte-segment-cjk", upload_as("d/" + "\u6f22" * 134), "255 bytes in UTF-8", code=2),
    Case("name-from-list-at", from_list("at-name.jsonl"), "at-name.jsonl line 2", code=2),
    Case("name-from-list-blank-segment", from_list("blank-name.jsonl"), "whitespace", code=2),
    Case("name-from-list-wide-segment", from_list("wide-segment.jsonl"), "255 bytes", code=2),
    # ------------------------------------------------------------------ issue 8: owners
    Case("owner-escape", upload_with("--owner", "evil\x1b[2J"), "U+001B", code=2),
    Case("owner-newline", upload_with("--owner", "alice\nroot"), "U+000A", code=2),
    Case("owner-only-spaces", upload_with("--owner", "   "), "invalid --owner", code=2),
    Case("owner-zero-width", upload_with("--owner", "al\u200bice"), "U+200B", code=2),
    Case("owner-from-list-escape", from_list("owner-escape.jsonl"), "U+001B", code=2),
    # ------------------------------------------------------------------ issue 8: metadata
    Case("meta-value-1e999", upload_with("--meta", "n=1.0e999"), "finite", code=2),
    Case("meta-value-minus-1e999", upload_with("--meta", "n=-1.0e999"), "finite", code=2),
    Case("meta-json-1e400", upload_with("--meta-json", "{meta}/inf-1e400.json"), "finite", code=2),
    Case("meta-json-nested-inf", upload_with("--meta-json", "{meta}/neg-inf.json"), "finite", code=2),
    Case("meta-json-key-escape", upload_with("--meta-json", "{meta}/key-escape.json"), "U+001B", code=2),
    Case("meta-json-key-newline", upload_with("--meta-json", "{meta}/key-newline.json"), "U+000A", code=2),
    Case("meta-json-over-64kib", upload_with("--meta-json", "{meta}/over-64kib.json"), "64 KiB", code=2),
    Case("meta-from-list-infinity", from_list("meta-infinity.jsonl"), "line 2", code=2),
    Case("meta-from-list-key-control", from_list("meta-key-control.jsonl"), "U+0007", code=2),
    Case("meta-from-list-over-64kib", from_list("meta-over-64kib.jsonl"), "64 KiB", code=2),
    Case("meta-key-replaces-nested", upload_with("--meta", "a.b=2", "--meta", "a=1"), "'a.b'", code=2),
    Case("meta-key-through-a-value", upload_with("--meta", "a=1", "--meta", "a.b=2"), "'a'", code=2),
    Case("meta-json-nested-300", upload_with("--meta-json", "{meta}/nested-300.json"), "levels", code=2),
    Case("meta-from-list-nested-400", from_list("meta-nested-400.jsonl"), "line 2", code=2),
    Case("meta-from-list-default-1e999", from_list("good.jsonl", "--meta", "n=1.0e999"), "finite", code=2),
    # ------------------------------------------------------------------ issue 8: sizes, filters, roots
    Case(
        "capacity-1.5-bytes", add_storage("new", "posix", "{b}", "--capacity", "1.5B"), "whole number", code=2
    ),
    Case(
        "capacity-0.3-kib", add_storage("new", "posix", "{b}", "--capacity", "0.3KiB"), "whole number", code=2
    ),
    Case("filter-1500-terms", where("size in (" + ",".join(["1"] * 1500) + ")"), "at most 500", code=2),
    Case(
        "filter-600-terms-in-two-lists",
        where("size in (" + ",".join(["1"] * 300) + ") or meta.k in (" + ",".join(["2"] * 300) + ")"),
        "at most 500",
        code=2,
    ),
    # NAME@v0 once named the newest version: `items delete NAME@v0 --yes` deleted it
    Case("ref-version-zero-delete", ("items", "delete", "run/f0.dat@v0", "--yes"), "no item", code=2),
    Case("ref-version-zero-show", ("items", "show", "run/f0.dat@v0"), "no item", code=2),
    Case("ref-version-past-int64", ("items", "show", "run/f0.dat@v99999999999999999999"), "no item", code=2),
    Case("list-limit-past-int64", ("items", "list", "--limit", "99999999999999999999"), "limit", code=2),
    Case("posix-root-missing-exit-2", add_storage("new", "posix", "{base}/nope"), "does not exist", code=2),
    # ------------------------------------------------------------------ API tokens
    Case("token-owner-empty", ("token", "create", "--owner", ""), "invalid --owner", code=2),
    Case("token-owner-control", ("token", "create", "--owner", "a\x1bb"), "--owner", code=2),
    Case("token-owner-missing", ("token", "create"), "--owner", code=2),
    Case("token-revoke-not-an-id", ("token", "revoke", "zz"), "invalid token id", code=2),
    Case("token-revoke-unknown", ("token", "revoke", "0123456789ab"), "no token", code=2),
    # ------------------------------------------------------------------ a copy's expiry
    Case(
        "copy-expiry-unknown-storage",
        ("items", "set-expiry", "run/f0.dat", "--storage", "nope", "--lifetime", "1d"),
        "unknown storage 'nope'",
        code=2,
    ),
    Case(
        "copy-expiry-no-copy-there",
        ("items", "set-expiry", "run/f0.dat", "--storage", "disk-b", "--lifetime", "1d"),
        "has no copy on storage 'disk-b'",
        code=2,
    ),
    Case(
        "copy-expiry-deleted-item",
        ("items", "set-expiry", "gone.dat", "--storage", "disk-a", "--never"),
        "already DELETED",
    ),
    Case(
        "copy-expiry-two-ways",
        ("items", "set-expiry", "run/f0.dat", "-s", "disk-a", "--never", "--lifetime", "1d"),
        "give exactly one of --lifetime, --at or --never",
        code=2,
    ),
    # ------------------------------------------------------------------ set-meta
    Case(
        "set-meta-overlap", ("items", "set-meta", "run/f0.dat", "a=1", "a.b=2"), "replace the other", code=2
    ),
    Case("set-meta-no-equals", ("items", "set-meta", "run/f0.dat", "novalue"), "no '='", code=2),
    Case(
        "set-meta-through-value", ("items", "set-meta", "run/f0.dat", "kind.sub=1"), "holds a value", code=2
    ),
    Case("set-meta-bad-key", ("items", "set-meta", "run/f0.dat", "a b=1"), "invalid metadata key", code=2),
    Case("set-meta-infinite", ("items", "set-meta", "run/f0.dat", "n=1.0e999"), "finite", code=2),
    Case("set-meta-deleted", ("items", "set-meta", "gone.dat", "k=1"), "DELETED"),
    Case("set-meta-nothing", ("items", "set-meta", "run/f0.dat"), "Missing argument"),
    # ------------------------------------------------------------------ storage set
    Case("set-nothing", ("storage", "set", "disk-a"), "nothing to change: give --capacity", code=2),
    Case("set-unknown", ("storage", "set", "nope", "--tier", "cold"), "unknown storage 'nope'", code=2),
    Case("set-tier-typo", ("storage", "set", "disk-a", "--tier", "lukewarm"), "invalid tier", code=2),
    Case("set-capacity-zero", ("storage", "set", "disk-a", "--capacity", "0"), "--capacity 0", code=2),
    Case("set-capacity-junk", ("storage", "set", "disk-a", "--capacity", "lots"), "size 'lots'", code=2),
    Case(
        "set-offline-and-draining",
        ("storage", "set", "disk-a", "--offline", "--draining"),
        "--draining and --offline contradict",
        code=2,
    ),
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
    if case.code is not None:
        assert r.code == case.code, r.err
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

    monkeypatch.setattr("lifecycle.catalogue.ingest.checksum_file", reads_then_grows)
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


# --------------------------------------------------------------------------- issue 8: environment and secrets


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("DLM_TRANSFER__TRANSFERS", "eight", "invalid setting DLM_TRANSFER__TRANSFERS"),
        ("DLM_TRANSFER__PARALLEL_BATCHES", "0", "invalid setting DLM_TRANSFER__PARALLEL_BATCHES"),
        ("DLM_POLICY", "{not json", "invalid setting DLM_POLICY"),
        ("DLM_OWNER", "evil\x1b[2J", "invalid setting DLM_OWNER"),
        ("DLM_OWNER", "alice\nroot", "U+000A"),
    ],
)
def test_invalid_setting_is_named_in_one_line(
    estate: Estate, dlm, monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    monkeypatch.setenv(var, value)
    with unchanged(estate):
        r = dlm(*upload_with())
    assert_refused(r, message)
    assert r.code == 2


def test_malformed_database_url_never_shows_its_password(
    estate: Estate, dlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DLM_DATABASE_URL", "postgresql://dlm:hunter2-secret@db.example:notaport/dlm")
    with unchanged(estate):
        r = dlm("items", "list")
    assert_refused(r, "invalid database URL 'postgresql://dlm:***@db.example")
    assert "hunter2" not in r.err + r.out
    assert r.code == 2


@pytest.mark.parametrize("where_", ["closed-port", "missing-database"])
def test_unreachable_or_missing_database_is_one_line(
    estate: Estate, dlm, monkeypatch: pytest.MonkeyPatch, where_: str
) -> None:
    if where_ == "closed-port":
        port = estate.paths["closed"].rsplit(":", 1)[1]
        url, message = f"postgresql://dlm:pw-secret@127.0.0.1:{port}/dlm", "cannot reach the catalogue"
    else:
        import sqlalchemy as sa

        admin = sa.engine.make_url(
            os.environ.get("DLM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1/x")
        )
        url = admin.set(database="dlm_no_such_db_corpus", password="pw-secret").render_as_string(
            hide_password=False
        )
        message = "does not exist"
    monkeypatch.setenv("DLM_DATABASE_URL", url)
    for argv in (("init",), ("items", "list"), ("status",)):
        with unchanged(estate):
            r = dlm(*argv)
        assert_refused(r, message)
        assert r.code == 1
        assert "pw-secret" not in r.err + r.out


def test_catalogue_of_a_newer_schema_is_refused(estate: Estate, dlm) -> None:
    """A catalogue migrated by a newer DLM: every command (init too) refuses it, nothing runs on it."""
    import sqlalchemy as sa

    from lifecycle.catalogue.db import get_engine

    engine = get_engine(estate.url)
    with engine.begin() as conn:
        rev = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    try:
        for argv in (("init",), ("items", "list"), upload_with(), ("status",)):
            with unchanged(estate):
                r = dlm(*argv)
            assert_refused(r, "catalogue schema 9999_from_the_future is newer than this DLM; upgrade DLM")
            assert r.code == 1
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :rev"), {"rev": rev})


@pytest.mark.parametrize(
    "endpoint", ["http://admin:s3cr3t-value@127.0.0.1:8333", "http://AKIAEXAMPLE@127.0.0.1:8333"]
)
def test_s3_endpoint_with_credentials_is_refused_without_echoing_them(
    estate: Estate, dlm, endpoint: str
) -> None:
    with unchanged(estate):
        r = dlm(*add_storage("s3-new", "s3", "some-bucket", "--endpoint", endpoint, "--json"))
    assert_refused(r, "use --credentials-env")
    assert r.code == 2
    assert "s3cr3t" not in r.err + r.out
