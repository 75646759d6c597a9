"""Storage backends: posix in temporary directories, S3 against the real SeaweedFS server."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devrig.seaweed import SeaweedServer
from lifecycle.errors import (
    CredentialsError,
    InvalidNameError,
    SourceNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from lifecycle.storage.base import StorageBackend
from lifecycle.storage.memory import MemoryStorage
from lifecycle.storage.posix import PosixStorage
from lifecycle.storage.s3 import S3Storage

PAYLOAD = b"spectra " * 1000


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def posix(tmp_path: Path) -> PosixStorage:
    root = tmp_path / "vol"
    root.mkdir()
    return PosixStorage("vol", str(root))


@pytest.fixture
def s3(s3_env: SeaweedServer, s3_bucket: str) -> Iterator[S3Storage]:
    storage = S3Storage("obj-store", f"{s3_bucket}/runs", endpoint=s3_env.endpoint, region="us-east-1")
    yield storage
    storage.close()


def _roundtrip(storage: StorageBackend, tmp_path: Path) -> None:
    src = tmp_path / "payload.bin"
    src.write_bytes(PAYLOAD)
    info = storage.put("a/b/file.bin", src, metadata={"kind": "raw"})
    assert info.path == "a/b/file.bin"
    assert info.size == len(PAYLOAD)
    storage.put("a/stream.bin", io.BytesIO(b"from a stream"))

    stat = storage.stat("a/b/file.bin")
    assert stat.size == len(PAYLOAD)
    assert stat.mtime is not None
    with storage.open("a/b/file.bin") as f:
        assert f.read() == PAYLOAD
    assert storage.checksum("a/b/file.bin", "md5") == hashlib.md5(PAYLOAD).hexdigest()
    assert storage.checksum("a/stream.bin", "sha256") == hashlib.sha256(b"from a stream").hexdigest()

    assert {(o.path, o.size) for o in storage.list()} == {
        ("a/b/file.bin", len(PAYLOAD)),
        ("a/stream.bin", 13),
    }
    assert [o.path for o in storage.list("a/b")] == ["a/b/file.bin"]
    assert list(storage.list("nothing/here")) == []

    storage.delete("a/b/file.bin")
    storage.delete("a/b/file.bin")  # absent is fine
    with pytest.raises(SourceNotFoundError, match=r"file\.bin"):
        storage.stat("a/b/file.bin")
    with pytest.raises(SourceNotFoundError):
        storage.open("a/b/file.bin")
    with pytest.raises(SourceNotFoundError):
        storage.checksum("a/b/file.bin", "md5")
    assert [o.path for o in storage.list()] == ["a/stream.bin"]


# --------------------------------------------------------------------------- posix


def test_posix_roundtrip(posix: PosixStorage, tmp_path: Path) -> None:
    posix.check()
    _roundtrip(posix, tmp_path)
    assert (posix.root / "a" / "stream.bin").read_bytes() == b"from a stream"


def test_posix_put_is_atomic_and_leaves_no_temp_files(posix: PosixStorage, tmp_path: Path) -> None:
    class Exploding(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            raise OSError("disk went away")

    posix.put("x.bin", io.BytesIO(b"first"))
    with pytest.raises(StorageError, match=r"cannot write 'x\.bin'"):
        posix.put("x.bin", io.BufferedReader(Exploding()))
    assert (posix.root / "x.bin").read_bytes() == b"first"
    assert os.listdir(posix.root) == ["x.bin"]
    with pytest.raises(SourceNotFoundError, match=r"nope\.bin"):
        posix.put("y.bin", tmp_path / "nope.bin")


def test_posix_metadata_survives_where_the_fs_has_xattrs(posix: PosixStorage) -> None:
    posix.put("m.bin", io.BytesIO(b"m"), metadata={"instrument": "lofar"})
    try:
        os.setxattr(posix.root / "m.bin", "user.probe", b"1")
    except OSError:
        pytest.skip("this file system keeps no user xattrs")
    assert posix.stat("m.bin").metadata["instrument"] == "lofar"


def test_posix_url_is_a_file_url_that_reads_the_bytes(posix: PosixStorage) -> None:
    posix.put("dir/with space.txt", io.BytesIO(b"hello"))
    url = posix.url("dir/with space.txt")
    assert url.startswith("file://")
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"hello"


def test_posix_resolve_accepts_paths_inside_the_root(posix: PosixStorage) -> None:
    assert posix.resolve(str(posix.root / "a" / "b.txt")) == "a/b.txt"
    assert posix.resolve("a/b.txt") == "a/b.txt"
    assert posix.resolve(str(posix.root) + "/a/./c/../b.txt") == "a/b.txt"


def test_posix_resolve_through_a_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    storage = PosixStorage("vol", str(tmp_path / "link"))
    assert storage.resolve(str(real / "x.dat")) == "x.dat"
    assert storage.resolve(str(tmp_path / "link" / "x.dat")) == "x.dat"


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/../../x", "/etc/passwd", "", "a\x00b"])
def test_posix_resolve_refuses_paths_outside_the_root(posix: PosixStorage, bad: str) -> None:
    with pytest.raises(InvalidNameError) as err:
        posix.resolve(bad)
    assert repr(bad)[1:-1][:10] in str(err.value) or bad == ""


def test_posix_resolve_refuses_the_root_and_its_siblings(posix: PosixStorage) -> None:
    sibling = posix.root.parent / "vol2" / "x"
    with pytest.raises(InvalidNameError, match="outside storage 'vol'"):
        posix.resolve(str(sibling))
    with pytest.raises(InvalidNameError):
        posix.resolve(str(posix.root))


def test_posix_symlink_cannot_escape_the_root(posix: PosixStorage, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.pem").write_bytes(b"secret")
    (posix.root / "escape").symlink_to(outside)
    (posix.root / "evil.pem").symlink_to(outside / "key.pem")

    for path in ("escape/key.pem", str(posix.root / "escape" / "key.pem"), "evil.pem"):
        with pytest.raises(InvalidNameError, match=r"outside|not inside"):
            posix.resolve(path)
    with pytest.raises(InvalidNameError):
        posix.open("escape/key.pem")
    with pytest.raises(InvalidNameError):
        posix.put("escape/new.bin", io.BytesIO(b"x"))
    assert not (outside / "new.bin").exists()
    assert list(posix.list()) == []


def test_posix_check_reports_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        PosixStorage("gone", str(tmp_path / "nope")).check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        PosixStorage("f", str(tmp_path / "file")).check()


def test_posix_rclone_target_is_the_absolute_root(posix: PosixStorage) -> None:
    target = posix.rclone_target()
    assert target.spec == str(posix.root)
    assert os.path.isabs(target.spec)
    assert dict(target.env) == {}


# --------------------------------------------------------------------------- memory


def test_memory_storage_is_one_instance_per_name(tmp_path: Path) -> None:
    MemoryStorage.reset_all()
    a = MemoryStorage.named("m1")
    assert MemoryStorage.named("m1") is a
    _roundtrip(a, tmp_path)
    a.available = False
    with pytest.raises(StorageUnavailableError):
        a.stat("a/stream.bin")
    with pytest.raises(StorageError, match="cannot be reached by rclone"):
        a.rclone_target()
    MemoryStorage.reset_all()
    assert MemoryStorage.named("m1") is not a


# --------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_s3_roundtrip(s3: S3Storage, s3_env: SeaweedServer, tmp_path: Path) -> None:
    s3.check()
    _roundtrip(s3, tmp_path)
    # The objects really are under the prefix of the bucket.
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert keys == ["runs/a/stream.bin"]


@pytest.mark.s3
def test_s3_stat_gives_md5_and_user_metadata(s3: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "p.bin"
    src.write_bytes(PAYLOAD)
    s3.put("p.bin", src, metadata={"instrument": "meerkat", "run": "42"})
    info = s3.stat("p.bin")
    assert info.checksum == hashlib.md5(PAYLOAD).hexdigest()
    assert info.checksum_algo == "md5"
    assert dict(info.metadata) == {"instrument": "meerkat", "run": "42"}
    listed = list(s3.list())
    assert [(o.path, o.checksum) for o in listed] == [("p.bin", hashlib.md5(PAYLOAD).hexdigest())]


@pytest.mark.s3
def test_s3_multipart_etag_is_not_taken_for_an_md5(s3: S3Storage, s3_env: SeaweedServer) -> None:
    client = s3_env.client()
    upload = client.create_multipart_upload(Bucket=s3.bucket, Key="runs/mp.bin")
    part = client.upload_part(
        Bucket=s3.bucket, Key="runs/mp.bin", PartNumber=1, UploadId=upload["UploadId"], Body=b"x" * 100
    )
    client.complete_multipart_upload(
        Bucket=s3.bucket,
        Key="runs/mp.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    info = s3.stat("mp.bin")
    if "-" not in client.head_object(Bucket=s3.bucket, Key="runs/mp.bin")["ETag"]:
        pytest.skip("this server gives multipart uploads a plain MD5 ETag")
    assert info.checksum is None
    assert s3.checksum("mp.bin", "md5") == hashlib.md5(b"x" * 100).hexdigest()


@pytest.mark.s3
def test_s3_presigned_url_downloads_the_bytes(s3: S3Storage) -> None:
    s3.put("share/data.bin", io.BytesIO(PAYLOAD))
    url = s3.url("share/data.bin", expires_s=300)
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == PAYLOAD


@pytest.mark.s3
def test_s3_resolve(s3: S3Storage) -> None:
    assert s3.resolve(f"s3://{s3.bucket}/runs/a/b.fits") == "a/b.fits"
    assert s3.resolve("a/b.fits") == "a/b.fits"
    with pytest.raises(InvalidNameError, match="other-bucket"):
        s3.resolve("s3://other-bucket/runs/a.fits")
    with pytest.raises(InvalidNameError, match="outside storage 'obj-store'"):
        s3.resolve(f"s3://{s3.bucket}/elsewhere/a.fits")
    with pytest.raises(InvalidNameError, match="outside"):
        s3.resolve(f"s3://{s3.bucket}/runsx/a.fits")
    for bad in ("../a", "a/../../b", "/abs", f"s3://{s3.bucket}/runs/../x"):
        with pytest.raises(InvalidNameError):
            s3.resolve(bad)


@pytest.mark.s3
def test_s3_wrong_credentials_are_one_clear_error(
    s3_env: SeaweedServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    storage = S3Storage("s", s3_bucket, endpoint=s3_env.endpoint)
    try:
        with pytest.raises(CredentialsError, match="rejected the credentials from AWS_ACCESS_KEY_ID"):
            storage.check()
        with pytest.raises(CredentialsError, match="storage 's'"):
            storage.put("x", io.BytesIO(b"x"))
        with pytest.raises(CredentialsError):
            list(storage.list())
    finally:
        storage.close()


@pytest.mark.s3
def test_s3_missing_credentials_name_the_variables(
    s3_env: SeaweedServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = S3Storage("s", s3_bucket, endpoint=s3_env.endpoint, credentials_env="ARCHIVE")
    with pytest.raises(CredentialsError, match="ARCHIVE_ACCESS_KEY_ID and ARCHIVE_SECRET_ACCESS_KEY"):
        storage.check()
    monkeypatch.setenv("ARCHIVE_ACCESS_KEY_ID", s3_env.access_key)
    with pytest.raises(CredentialsError, match="set ARCHIVE_SECRET_ACCESS_KEY"):
        storage.rclone_target()
    monkeypatch.setenv("ARCHIVE_SECRET_ACCESS_KEY", s3_env.secret_key)
    storage.check()  # read at use time: now it works
    storage.close()


@pytest.mark.s3
def test_s3_unreachable_endpoint_fails_fast(s3_env: SeaweedServer) -> None:
    port = _closed_port()
    storage = S3Storage("far", "bucket", endpoint=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=f"127.0.0.1:{port} is unreachable"):
        storage.check()
    with pytest.raises(StorageUnavailableError):
        storage.stat("x")
    assert time.monotonic() - started < 10
    storage.close()


@pytest.mark.s3
def test_s3_missing_bucket_names_the_bucket(s3_env: SeaweedServer) -> None:
    storage = S3Storage("s", "no-such-bucket-here", endpoint=s3_env.endpoint)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist") as err:
        storage.check()
    assert not isinstance(err.value, CredentialsError)
    storage.close()


@pytest.mark.s3
def test_s3_rclone_target_defines_the_remote_in_env(s3: S3Storage, s3_env: SeaweedServer) -> None:
    target = s3.rclone_target()
    assert target.spec == f"dlm_obj_store:{s3.bucket}/runs"
    env = dict(target.env)
    assert env["RCLONE_CONFIG_DLM_OBJ_STORE_TYPE"] == "s3"
    assert env["RCLONE_CONFIG_DLM_OBJ_STORE_ENDPOINT"] == s3_env.endpoint
    assert env["RCLONE_CONFIG_DLM_OBJ_STORE_ACCESS_KEY_ID"] == s3_env.access_key
    assert env["RCLONE_CONFIG_DLM_OBJ_STORE_SECRET_ACCESS_KEY"] == s3_env.secret_key
    assert env["RCLONE_CONFIG_DLM_OBJ_STORE_FORCE_PATH_STYLE"] == "true"
