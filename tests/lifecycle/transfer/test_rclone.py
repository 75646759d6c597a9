"""The rclone layer and the rclone storage, against the real rclone binary and SeaweedFS."""

from __future__ import annotations

import hashlib
import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devrig.seaweed import SeaweedServer
from lifecycle.errors import InvalidValueError, SourceNotFoundError, StorageError
from lifecycle.storage.posix import PosixStorage
from lifecycle.storage.rclone import RcloneStorage
from lifecycle.storage.s3 import S3Storage
from lifecycle.transfer.binary import rclone_binary
from lifecycle.transfer.log import error_class
from lifecycle.transfer.operations import copy_files, delete_files, hashsum, lsjson, move_files
from lifecycle.transfer.process import run
from lifecycle.transfer.target import RcloneTarget

pytestmark = [pytest.mark.rclone]


def _payload(i: int) -> bytes:
    return f"file {i}\n".encode() * (i % 7 + 1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def src_tree(tmp_path: Path) -> PosixStorage:
    root = tmp_path / "src"
    for i in range(200):
        path = root / f"d{i % 10}" / f"f{i:03d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_payload(i))
    return PosixStorage("src", str(root))


FILES = [f"d{i % 10}/f{i:03d}.dat" for i in range(200)]


@pytest.fixture
def s3(s3_env: SeaweedServer, s3_bucket: str) -> Iterator[S3Storage]:
    storage = S3Storage("dst-s3", f"{s3_bucket}/copies", endpoint=s3_env.endpoint)
    yield storage
    storage.close()


def test_rclone_binary_is_recent(rclone_path: str) -> None:
    assert rclone_binary() == rclone_path
    proc = run(["version"])
    assert proc.returncode == 0
    major, minor = proc.stdout.decode().split()[1].lstrip("v").split(".")[:2]
    assert (int(major), int(minor)) >= (1, 65)
    assert b"Config file" not in proc.stderr


@pytest.mark.s3
def test_copy_posix_to_s3_in_one_process(
    rclone_path: str, src_tree: PosixStorage, s3: S3Storage, s3_env: SeaweedServer
) -> None:
    report = copy_files(src_tree.rclone_target(), s3.rclone_target(), [*FILES, "d0/missing.dat"])

    assert report.ok == set(FILES)
    assert set(report.failed) == {"d0/missing.dat"}
    assert "not found" in report.failed["d0/missing.dat"]
    assert report.bytes == sum(len(_payload(i)) for i in range(200))
    client = s3_env.client()
    for i in (0, 57, 199):
        body = client.get_object(Bucket=s3.bucket, Key=f"copies/{FILES[i]}")["Body"]
        with body:
            assert body.read() == _payload(i)
    assert sum(1 for _ in s3.list()) == 200
    # rclone's own end-to-end check: the digest both ends agreed on, per copied file
    assert report.hashes[FILES[57]] == ("md5", hashlib.md5(_payload(57)).hexdigest())
    assert set(report.hashes) == set(FILES)

    # A second run finds everything identical: all ok, nothing transferred.
    again = copy_files(src_tree.rclone_target(), s3.rclone_target(), FILES[:20])
    assert again.ok == set(FILES[:20])
    assert again.failed == {}
    assert again.bytes == 0


@pytest.mark.s3
def test_copy_s3_to_posix_never_replaces_different_bytes(
    rclone_path: str, s3: S3Storage, tmp_path: Path
) -> None:
    s3.put("a/one.bin", io.BytesIO(b"one"))
    s3.put("b/two.bin", io.BytesIO(b"two"))
    dst = PosixStorage("dst", str(tmp_path / "dst"))
    report = copy_files(s3.rclone_target(), dst.rclone_target(), ["a/one.bin", "b/two.bin"])
    assert report.ok == {"a/one.bin", "b/two.bin"}
    assert (tmp_path / "dst" / "a" / "one.bin").read_bytes() == b"one"

    # Different bytes at the destination are someone's: the copy fails and leaves them (a
    # corrupt copy of DLM's own is deleted first by repair, then copied).
    (tmp_path / "dst" / "b" / "two.bin").write_bytes(b"corrupted!")
    report = copy_files(s3.rclone_target(), dst.rclone_target(), ["a/one.bin", "b/two.bin"])
    assert report.ok == {"a/one.bin"}  # the same bytes already there: a retry's copy is accepted
    assert "already exists" in report.failed["b/two.bin"]
    assert (tmp_path / "dst" / "b" / "two.bin").read_bytes() == b"corrupted!"


@pytest.mark.s3
def test_move_files_removes_the_source(rclone_path: str, s3: S3Storage, tmp_path: Path) -> None:
    src = PosixStorage("m", str(tmp_path / "m"))
    src.put("x/y.bin", io.BytesIO(b"moving"))
    report = move_files(src.rclone_target(), s3.rclone_target(), ["x/y.bin"])
    assert report.ok == {"x/y.bin"}
    assert not (tmp_path / "m" / "x" / "y.bin").exists()
    with s3.open("x/y.bin") as f:
        assert f.read() == b"moving"


@pytest.mark.s3
def test_copy_with_wrong_credentials_fails_every_file(
    rclone_path: str, src_tree: PosixStorage, s3: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    report = copy_files(src_tree.rclone_target(), s3.rclone_target(), FILES[:30])
    assert report.ok == set()
    assert set(report.failed) == set(FILES[:30])
    reasons = set(report.failed.values())
    assert all(error_class(reason).__name__ == "CredentialsError" for reason in reasons), reasons
    assert report.returncode != 0


@pytest.mark.s3
def test_copy_to_an_unreachable_endpoint_fails_every_file_quickly(
    rclone_path: str, src_tree: PosixStorage, s3_env: SeaweedServer
) -> None:
    far = S3Storage("far", "bucket", endpoint=f"http://127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    report = copy_files(src_tree.rclone_target(), far.rclone_target(), FILES[:10])
    assert time.monotonic() - started < 60
    assert report.ok == set()
    assert set(report.failed) == set(FILES[:10])
    assert all("connection refused" in reason for reason in report.failed.values()), report.failed
    assert all(error_class(reason).__name__ == "StorageUnavailableError" for reason in report.failed.values())


def test_copy_from_a_missing_source_directory_fails_every_file(rclone_path: str, tmp_path: Path) -> None:
    report = copy_files(
        RcloneTarget(str(tmp_path / "nowhere")), RcloneTarget(str(tmp_path / "dst")), ["a", "b/c"]
    )
    assert report.ok == set()
    assert set(report.failed) == {"a", "b/c"}


def test_copy_refuses_a_name_with_a_line_break(rclone_path: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidValueError, match="line break"):
        copy_files(RcloneTarget(str(tmp_path)), RcloneTarget(str(tmp_path / "d")), ["a\nb"])


@pytest.mark.s3
def test_delete_files_in_one_process(rclone_path: str, s3: S3Storage, s3_env: SeaweedServer) -> None:
    for name in ("keep.bin", "x/gone1.bin", "x/gone2.bin"):
        s3.put(name, io.BytesIO(name.encode()))
    report = delete_files(s3.rclone_target(), ["x/gone1.bin", "x/gone2.bin", "never/was.bin"])
    assert report.failed == {}
    assert report.ok == {"x/gone1.bin", "x/gone2.bin", "never/was.bin"}
    assert [o.path for o in s3.list()] == ["keep.bin"]


@pytest.mark.s3
def test_delete_files_with_wrong_credentials_fails(
    rclone_path: str, s3: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put("x.bin", io.BytesIO(b"x"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    report = delete_files(s3.rclone_target(), ["x.bin"])
    assert set(report.failed) == {"x.bin"}
    monkeypatch.undo()


@pytest.mark.s3
def test_lsjson_with_hash_on_s3_gives_md5(rclone_path: str, s3: S3Storage) -> None:
    blobs = {f"h/{i}.bin": _payload(i) * 50 for i in range(5)}
    for name, data in blobs.items():
        s3.put(name, io.BytesIO(data))
    listed = {o.path: o for o in lsjson(s3.rclone_target(), hash=True)}
    assert set(listed) == set(blobs)
    for name, data in blobs.items():
        assert listed[name].size == len(data)
        assert listed[name].checksum == hashlib.md5(data).hexdigest()
        assert listed[name].checksum_algo == "md5"
        assert listed[name].mtime is not None


def test_lsjson_of_a_missing_directory_raises(rclone_path: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="directory not found"):
        list(lsjson(RcloneTarget(str(tmp_path / "absent"))))


def test_lsjson_can_stop_early_without_leaking_the_process(rclone_path: str, src_tree: PosixStorage) -> None:
    stream = lsjson(src_tree.rclone_target())
    first = next(stream)
    assert first.path in FILES
    stream.close()  # kills rclone; -W error catches a leaked process or pipe


@pytest.mark.s3
def test_hashsum_posix_and_s3(rclone_path: str, src_tree: PosixStorage, s3: S3Storage) -> None:
    wanted = FILES[:5]
    sha = hashsum(src_tree.rclone_target(), [*wanted, "absent.dat"], "sha256")
    assert sha == {p: hashlib.sha256((src_tree.root / p).read_bytes()).hexdigest() for p in wanted}

    copy_files(src_tree.rclone_target(), s3.rclone_target(), wanted)
    md5 = hashsum(s3.rclone_target(), wanted, "md5")
    assert md5 == {p: hashlib.md5((src_tree.root / p).read_bytes()).hexdigest() for p in wanted}
    # S3 keeps no SHA-256: rclone reads the bytes.
    assert hashsum(s3.rclone_target(), wanted, "sha256") == sha
    with pytest.raises(InvalidValueError, match="blake2b"):
        hashsum(s3.rclone_target(), wanted, "blake2b")


# --------------------------------------------------------------------------- RcloneStorage


@pytest.fixture
def local_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RcloneStorage:
    monkeypatch.setenv("RCLONE_CONFIG_LABDISK_TYPE", "local")
    root = tmp_path / "labdisk"
    root.mkdir()
    return RcloneStorage("lab", f"labdisk:{root}")


def test_rclone_storage_on_a_local_remote(
    rclone_path: str, local_remote: RcloneStorage, tmp_path: Path
) -> None:
    local_remote.check()
    src = tmp_path / "in.bin"
    src.write_bytes(b"payload " * 5000)
    info = local_remote.put("obs/in.bin", src)
    assert info.size == 40000
    local_remote.put("obs/stream.txt", io.BytesIO(b"streamed"))
    assert (tmp_path / "labdisk" / "obs" / "stream.txt").read_bytes() == b"streamed"

    with local_remote.open("obs/in.bin") as f:
        assert f.read() == b"payload " * 5000
    assert local_remote.checksum("obs/in.bin", "sha256") == hashlib.sha256(b"payload " * 5000).hexdigest()
    assert sorted(o.path for o in local_remote.list()) == ["obs/in.bin", "obs/stream.txt"]
    assert sorted(o.path for o in local_remote.list("obs")) == ["obs/in.bin", "obs/stream.txt"]
    assert list(local_remote.list("empty")) == []
    assert local_remote.resolve(f"{local_remote.root}/obs/in.bin") == "obs/in.bin"

    with pytest.raises(StorageError, match="cannot make links"):
        local_remote.url("obs/in.bin")

    local_remote.delete("obs/in.bin")
    local_remote.delete("obs/in.bin")
    with pytest.raises(SourceNotFoundError, match=r"obs/in\.bin"):
        local_remote.stat("obs/in.bin")
    with pytest.raises(SourceNotFoundError):
        local_remote.open("obs/in.bin")


def test_rclone_storage_early_close_does_not_leak(rclone_path: str, local_remote: RcloneStorage) -> None:
    local_remote.put("big.bin", io.BytesIO(b"z" * (4 * 1024 * 1024)))
    stream = local_remote.open("big.bin")
    assert stream.read(10) == b"z" * 10
    stream.close()


def test_rclone_storage_unknown_remote_or_missing_root(rclone_path: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="remote 'nosuchremote' is not configured"):
        RcloneStorage("x", "nosuchremote:data").check()
    with pytest.raises(StorageError, match="does not exist"):
        RcloneStorage("y", str(tmp_path / "absent")).check()


@pytest.mark.s3
def test_rclone_storage_on_an_s3_remote_defined_by_env(
    rclone_path: str, s3: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = s3.rclone_target()
    for key, value in target.env.items():
        monkeypatch.setenv(key, value)
    s3.put("seed.bin", io.BytesIO(b"seed"))
    remote = RcloneStorage("via-rclone", target.spec)
    remote.check()

    info = remote.put("new/obj.bin", io.BytesIO(b"written by rclone"), metadata={"owner": "ana"})
    assert info.size == len(b"written by rclone")
    assert info.checksum == hashlib.md5(b"written by rclone").hexdigest()
    # What rclone wrote, boto3 reads, with its metadata.
    with s3.open("new/obj.bin") as f:
        assert f.read() == b"written by rclone"
    assert s3.stat("new/obj.bin").metadata.get("owner") == "ana"

    assert sorted(o.path for o in remote.list()) == ["new/obj.bin", "seed.bin"]
    assert remote.checksum("seed.bin", "md5") == hashlib.md5(b"seed").hexdigest()
    remote.delete("seed.bin")
    assert [o.path for o in s3.list()] == ["new/obj.bin"]


def test_copy_files_large_file_multi_thread_copy_is_reported(tmp_path: Path, rclone_path: str) -> None:
    """Over rclone's multi-thread cutoff (256 MiB) the log says 'Multi-thread Copied': still a success."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    with open(src / "big.bin", "wb") as f:
        f.truncate(300 * 1024 * 1024)
    report = copy_files(RcloneTarget(str(src)), RcloneTarget(str(dst)), ["big.bin"])
    assert report.ok == {"big.bin"} and not report.failed
    assert (dst / "big.bin").stat().st_size == 300 * 1024 * 1024


@pytest.mark.s3
def test_a_large_upload_to_s3_keeps_an_md5_readable_without_download(
    tmp_path: Path, rclone_path: str, s3: S3Storage
) -> None:
    """Above the multi-thread cutoff, S3 uploads still carry the source's MD5 (md5chksum), so
    the copy is checked by rclone and by `hashsum` without reading it back."""
    src = tmp_path / "src"
    src.mkdir()
    data = bytes(range(256)) * (260 * 4096)  # 260 MiB
    (src / "big.bin").write_bytes(data)
    report = copy_files(RcloneTarget(str(src)), s3.rclone_target(), ["big.bin"])
    md5 = hashlib.md5(data).hexdigest()
    assert report.ok == {"big.bin"} and report.hashes == {"big.bin": ("md5", md5)}
    assert hashsum(s3.rclone_target(), ["big.bin"], "md5", download=False) == {"big.bin": md5}
