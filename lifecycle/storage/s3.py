"""A storage that is a bucket (or a prefix in one) of an S3 service, through boto3.

Long because S3Storage is one class: each StorageBackend method sits with the S3 error
mapping, multipart and checksum rules it needs, and splitting the class would scatter them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn, cast

from lifecycle.checksum import checksum_file, checksum_stream
from lifecycle.errors import (
    ConflictError,
    CredentialsError,
    DLMError,
    InvalidNameError,
    InvalidValueError,
    RootNotFoundError,
    SourceNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from lifecycle.names import validate_name
from lifecycle.transfer.target import ObjectInfo, RcloneTarget

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
# Objects up to this size are uploaded in one PUT, so their ETag is their MD5.
MULTIPART_THRESHOLD = 256 * 1024**2
# Parts of a multipart upload (at least; larger for files over 9000 parts).
PART_SIZE = 64 * 1024**2
# rclone's metadata key for the MD5 of a multipart object (base64); we write and read it too.
MD5_META = "md5chksum"

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "403",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "500",
    "502",
    "503",
    "504",
}


class S3Storage:
    """Objects under `bucket/prefix` of an S3 endpoint; credentials come from environment
    variables `<credentials_env>_ACCESS_KEY_ID` / `_SECRET_ACCESS_KEY`, read at use time."""

    def __init__(
        self,
        name: str,
        root: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        credentials_env: str | None = None,
    ) -> None:
        self.name = name
        root = root.removeprefix("s3://").strip("/")
        bucket, _, prefix = root.partition("/")
        if not bucket:
            raise InvalidNameError(f"storage '{name}': S3 root {root!r} names no bucket")
        self.bucket = bucket
        self.prefix = validate_name(prefix, what="S3 prefix") if prefix else ""
        self.endpoint = endpoint
        self.region = region or DEFAULT_REGION
        self.credentials_env = credentials_env or "AWS"
        self._client: S3Client | None = None
        self._client_key: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"S3Storage({self.name!r}, {self.bucket + ('/' + self.prefix if self.prefix else '')!r})"

    # ----------------------------------------------------------------- plumbing

    @property
    def _key_vars(self) -> tuple[str, str]:
        return (f"{self.credentials_env}_ACCESS_KEY_ID", f"{self.credentials_env}_SECRET_ACCESS_KEY")

    def _credentials(self) -> tuple[str, str]:
        """Raises CredentialsError naming the variables that are not set."""
        names = self._key_vars
        values = [os.environ.get(n, "") for n in names]
        missing = [n for n, v in zip(names, values, strict=True) if not v]
        if missing:
            raise CredentialsError(
                f"storage '{self.name}': set {' and '.join(missing)} to reach S3"
                + (f" at {self.endpoint}" if self.endpoint else "")
            )
        return values[0], values[1]

    def client(self) -> S3Client:
        """A boto3 client with the current credentials: path-style, and every call bounded by
        the connect and stall timeouts and low-level retries of DLM_TRANSFER__* (a stalled
        server fails the call instead of hanging it). Raises CredentialsError if the
        variables are not set."""
        key = self._credentials()
        if self._client is None or self._client_key != key:
            import boto3
            from botocore.config import Config

            from lifecycle.settings import get_settings

            t = get_settings().transfer
            self.close()
            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint or None,
                region_name=self.region,
                aws_access_key_id=key[0],
                aws_secret_access_key=key[1],
                config=Config(
                    connect_timeout=t.contimeout_s,
                    read_timeout=t.stall_timeout_s,
                    retries={"max_attempts": t.low_level_retries, "mode": "standard"},
                    s3={"addressing_style": "path"},
                    signature_version="s3v4",
                    # Checksums only where S3 requires them: other vendors' servers may
                    # reject the newer default CRC headers.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
            self._client_key = key
        return self._client

    def close(self) -> None:
        """Close the client's connections (reopened on next use)."""
        client, self._client, self._client_key = self._client, None, None
        if client is not None:
            client.close()

    def _key(self, path: str) -> str:
        name = validate_name(path, what="path")
        return f"{self.prefix}/{name}" if self.prefix else name

    def _where(self) -> str:
        return self.endpoint or "AWS S3"

    def _fail(self, exc: Exception, path: str | None = None) -> NoReturn:
        """Raise the DLM error for a boto3/botocore exception (one line naming the cause)."""
        from botocore import exceptions as bx

        what = f"storage '{self.name}'"
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            raise CredentialsError(f"{what}: no S3 credentials: set {' and '.join(self._key_vars)}") from exc
        if isinstance(
            exc,
            bx.EndpointConnectionError
            | bx.ConnectTimeoutError
            | bx.ReadTimeoutError
            | bx.ConnectionClosedError
            | bx.ProxyConnectionError
            | bx.HTTPClientError,
        ):
            raise StorageUnavailableError(
                f"{what}: S3 endpoint {self._where()} is unreachable ({type(exc).__name__})"
            ) from exc
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = str(err.get("Message", "")) or code
            if code in _CREDENTIAL_CODES or status == 403:
                raise CredentialsError(
                    f"{what}: S3 at {self._where()} rejected the credentials from "
                    f"{'/'.join(self._key_vars)} ({code or status}"
                    + (f": {message}" if message and message != code else "")
                    + ")"
                ) from exc
            if code == "NoSuchBucket" or (path is None and code in ("404", "NotFound")):
                raise RootNotFoundError(
                    f"{what}: bucket {self.bucket!r} does not exist at {self._where()}"
                ) from exc
            if code in ("NoSuchKey", "404", "NotFound"):
                raise SourceNotFoundError(f"{path!r} not found on storage '{self.name}'") from exc
            if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                raise StorageUnavailableError(
                    f"{what}: S3 at {self._where()} is unavailable ({code}: {message})"
                ) from exc
            raise StorageError(f"{what}: S3 error {code}: {message}") from exc
        if isinstance(exc, bx.BotoCoreError | ValueError):
            raise StorageError(f"{what}: {exc}") from exc
        raise exc

    @contextlib.contextmanager
    def _errors(self, path: str | None = None) -> Iterator[None]:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            self._fail(exc, path)
        except S3UploadFailedError as exc:
            # boto3's transfer manager re-raises a failed upload's ClientError as this.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, BotoCoreError | ClientError):
                self._fail(cause, path)
            raise StorageError(f"storage '{self.name}': {exc}") from exc

    # ----------------------------------------------------------------- names

    def resolve(self, user_path: str) -> str:
        """The root-relative name of `s3://bucket/key` (same bucket, key under the prefix) or
        of a key relative to the prefix. Raises InvalidNameError."""
        if user_path.startswith("s3://"):
            bucket, _, key = user_path[len("s3://") :].partition("/")
            if bucket != self.bucket:
                raise InvalidNameError(
                    f"{user_path!r} is in bucket {bucket!r}, not in storage '{self.name}' "
                    f"(bucket {self.bucket!r})"
                )
            if self.prefix:
                if not key.startswith(self.prefix + "/"):
                    raise InvalidNameError(
                        f"{user_path!r} is outside storage '{self.name}' (s3://{self.bucket}/{self.prefix}/)"
                    )
                key = key[len(self.prefix) + 1 :]
            user_path = key
        try:
            return validate_name(user_path, what="path")
        except InvalidNameError as exc:
            raise InvalidNameError(f"storage '{self.name}': {exc}") from exc

    def _name_of(self, key: str) -> str | None:
        rel = key[len(self.prefix) + 1 :] if self.prefix else key
        try:
            return validate_name(rel, what="path")
        except InvalidNameError:
            log.warning("storage %r: skipping object with an invalid name %r", self.name, key)
            return None

    # ----------------------------------------------------------------- operations

    def check(self) -> None:
        """HEAD the bucket. Raises CredentialsError, StorageUnavailableError, StorageError."""
        client = self.client()
        with self._errors():
            client.head_bucket(Bucket=self.bucket)

    def stat(self, path: str) -> ObjectInfo:
        """Size, mtime, MD5 (single-part ETag, or rclone's md5chksum) and user metadata.
        Raises SourceNotFoundError, CredentialsError, StorageUnavailableError, StorageError."""
        client = self.client()
        with self._errors(path):
            head = client.head_object(Bucket=self.bucket, Key=self._key(path))
        meta = dict(head.get("Metadata", {}))
        md5 = _md5_of(str(head.get("ETag", "")), meta)
        meta.pop(MD5_META, None)
        meta = decode_metadata(meta)
        return ObjectInfo(
            path=validate_name(path, what="path"),
            size=int(head.get("ContentLength", 0)),
            mtime=head.get("LastModified"),
            checksum=md5,
            checksum_algo="md5" if md5 else None,
            metadata=meta,
        )

    def open(self, path: str) -> BinaryIO:
        """The object's body as a stream (close it). Raises SourceNotFoundError,
        CredentialsError, StorageUnavailableError, StorageError."""
        client = self.client()
        with self._errors(path):
            response = client.get_object(Bucket=self.bucket, Key=self._key(path))
        return cast(BinaryIO, response["Body"])

    def put(
        self, path: str, src: Path | BinaryIO, *, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Upload a file or a stream with user metadata, never over an existing object: a
        conditional write (If-None-Match: *) on the PUT or on completing a multipart upload,
        after a HEAD that refuses at once. Each multipart part is checked against the MD5 the
        server returns for it; a file whose bytes differ from its MD5 read before the upload
        (it changed meanwhile) is not completed. Metadata values are percent-encoded where
        they are not plain ASCII (S3 metadata must be). Raises ConflictError (the object
        exists), SourceNotFoundError (src file missing), CredentialsError,
        StorageUnavailableError, StorageError."""
        client = self.client()
        key = self._key(path)
        meta = encode_metadata(metadata or {})
        with contextlib.ExitStack() as stack:
            if isinstance(src, Path):
                try:
                    size: int | None = src.stat().st_size
                    stream: BinaryIO = stack.enter_context(open(src, "rb"))
                except (FileNotFoundError, NotADirectoryError) as exc:
                    raise SourceNotFoundError(f"source file {src} not found") from exc
                if size is not None and size >= MULTIPART_THRESHOLD:
                    # A multipart ETag is no MD5: record it as rclone does.
                    digest = checksum_file(src, "md5")[0]
                    meta[MD5_META] = base64.b64encode(bytes.fromhex(digest)).decode()
            else:
                size, stream = None, src
            self._refuse_existing(path)
            first = stream.read(MULTIPART_THRESHOLD) if size is None else b""
            with self._errors(path):
                try:
                    if size is not None and size < MULTIPART_THRESHOLD:
                        client.put_object(
                            Bucket=self.bucket, Key=key, Body=stream, Metadata=meta, IfNoneMatch="*"
                        )
                    elif size is None and len(first) < MULTIPART_THRESHOLD:
                        client.put_object(
                            Bucket=self.bucket, Key=key, Body=first, Metadata=meta, IfNoneMatch="*"
                        )
                    else:
                        self._put_multipart(key, path, stream, first, meta, size)
                except Exception as exc:
                    self._conflict(exc, path)
                    raise
        return self.stat(path)

    def _refuse_existing(self, path: str) -> None:
        """Raises ConflictError if the object exists (for servers that ignore If-None-Match)."""
        with contextlib.suppress(SourceNotFoundError):
            self.stat(path)
            raise ConflictError(
                f"{path!r} already exists on storage '{self.name}': DLM never writes over an object"
            )

    def _conflict(self, exc: Exception, path: str) -> None:
        """Raises ConflictError if `exc` is S3's answer to a conditional write on an existing key."""
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise ConflictError(
                    f"{path!r} already exists on storage '{self.name}': DLM never writes over an object"
                ) from None

    def _put_multipart(
        self, key: str, path: str, stream: BinaryIO, first: bytes, meta: dict[str, str], size: int | None
    ) -> None:
        """Upload in parts, each checked against the server's MD5 of it, then complete only if
        no object appeared meanwhile; aborts on any failure. Raises StorageError, ClientError."""
        import hashlib

        client = self.client()
        part_size = max(PART_SIZE, -(-(size or 0) // 9000))
        whole = hashlib.md5()
        upload = client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=meta)
        upload_id = upload["UploadId"]
        try:
            parts = []
            pending = first
            number = 1
            while True:
                if len(pending) < part_size:
                    pending += stream.read(part_size - len(pending))
                data, pending = pending[:part_size], pending[part_size:]
                if not data and number > 1:
                    break
                md5 = hashlib.md5(data).hexdigest()
                whole.update(data)
                answer = client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
                etag = str(answer.get("ETag", "")).strip('"').lower()
                if etag and etag != md5:
                    raise StorageError(
                        f"storage '{self.name}': part {number} of {path!r} arrived damaged "
                        f"(MD5 {etag}, sent {md5})"
                    )
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
                number += 1
                if len(data) < part_size:
                    break
            claimed = meta.get(MD5_META)
            if claimed and base64.b64decode(claimed).hex() != whole.hexdigest():
                raise StorageError(
                    f"storage '{self.name}': the source of {path!r} changed while it was uploaded"
                )
            client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                IfNoneMatch="*",
            )
        except BaseException:
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def delete(self, path: str) -> None:
        """Absent is fine. Raises CredentialsError, StorageUnavailableError, StorageError."""
        client = self.client()
        with self._errors(path):
            client.delete_object(Bucket=self.bucket, Key=self._key(path))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under the directory `prefix`, page by page (no user metadata: that
        needs a HEAD per object). Raises CredentialsError, StorageUnavailableError,
        StorageError."""
        client = self.client()
        parts = [p for p in (self.prefix, validate_name(prefix, what="path") if prefix else "") if p]
        key_prefix = "/".join(parts) + "/" if parts else ""
        paginator = client.get_paginator("list_objects_v2")
        with self._errors():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix):
                for obj in page.get("Contents", []):
                    key = obj.get("Key", "")
                    if key.endswith("/") or key.rpartition("/")[2] in (".dlm-storage", DIGEST_CHECK):
                        continue  # the marker, the upload-digest probe
                    name = self._name_of(key)
                    if name is None:
                        continue
                    md5 = _md5_of(str(obj.get("ETag", "")), {})
                    yield ObjectInfo(
                        path=name,
                        size=int(obj.get("Size", 0)),
                        mtime=obj.get("LastModified"),
                        checksum=md5,
                        checksum_algo="md5" if md5 else None,
                    )

    def checksum(self, path: str, algo: str) -> str:
        """Hex digest of the object's bytes, streamed. Raises SourceNotFoundError,
        InvalidValueError, CredentialsError, StorageUnavailableError, StorageError."""
        body = self.open(path)
        try:
            with self._errors(path):
                return checksum_stream(body, algo)[0]
        finally:
            body.close()

    def url(self, path: str, expires_s: int = 3600) -> str:
        """A presigned GET URL valid for `expires_s` seconds. Raises CredentialsError."""
        client = self.client()
        with self._errors(path):
            return client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(path)},
                ExpiresIn=expires_s,
            )

    def upload_url(
        self, path: str, md5: str, expires_s: int = 3600, *, size: int | None = None
    ) -> tuple[str, dict[str, str]]:
        """A presigned PUT URL for `path`, valid for `expires_s` seconds, and the headers the
        PUT must send: the URL is signed for a Content-MD5 of `md5` (hex), and with `size` for
        that Content-Length, so S3 stores only those bytes through it (other bytes, or as many
        bytes as declared, are refused, and so is a PUT without the header).
        Raises CredentialsError, InvalidValueError (not an MD5)."""
        try:
            content_md5 = base64.b64encode(bytes.fromhex(md5)).decode()
        except ValueError:
            content_md5 = ""
        if len(md5) != 32 or not content_md5:
            raise InvalidValueError(f"invalid md5 {md5[:80]!r}: must be 32 hex digits")
        client = self.client()
        with self._errors(path):
            url = client.generate_presigned_url(
                "put_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": self._key(path),
                    "ContentMD5": content_md5,
                    **({} if size is None else {"ContentLength": size}),
                },
                ExpiresIn=expires_s,
            )
        return url, {"Content-MD5": content_md5}

    def rclone_target(self) -> RcloneTarget:
        """Remote `dlm_<name>:<bucket>/<prefix>` defined by RCLONE_CONFIG_DLM_<NAME>_* variables
        (credentials copied from the environment now). Raises CredentialsError."""
        access, secret = self._credentials()
        remote, var = self._remote()
        env = {
            var + "TYPE": "s3",
            var + "PROVIDER": "Other",
            var + "ENV_AUTH": "false",
            var + "ACCESS_KEY_ID": access,
            var + "SECRET_ACCESS_KEY": secret,
            var + "REGION": self.region,
            var + "FORCE_PATH_STYLE": "true",
            # DLM checks buckets itself (check()); rclone must not try to create them.
            var + "NO_CHECK_BUCKET": "true",
            var + "UPLOAD_CUTOFF": f"{RCLONE_UPLOAD_CUTOFF}B",  # bytes: a bare number is KiB
        }
        if self.endpoint:
            env[var + "ENDPOINT"] = self.endpoint
        path = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return RcloneTarget(spec=f"{remote}:{path}", env=env, upload_flags=S3_UPLOAD_FLAGS)

    def _remote(self) -> tuple[str, str]:
        """The rclone remote's name, and the prefix of the RCLONE_CONFIG_* variables defining it."""
        remote = "dlm_" + self.name.replace("-", "_")
        return remote, "RCLONE_CONFIG_" + remote.upper() + "_"

    def upload_target(self, largest: int) -> RcloneTarget:
        """rclone_target() for copying files of at most `largest` bytes INTO this storage.
        Where every one is uploaded in a single PUT (below RCLONE_UPLOAD_CUTOFF) and the service
        refuses a body that is not its Content-MD5 (checks_upload_digests), rclone does not
        HEAD each object after its PUT: the service has then checked the bytes it stored
        against the MD5 rclone sent (the source's), and rclone's digest is the PUT's ETag. That
        HEAD is a quarter of the time of a copy of small files. Parts of a larger file carry
        an MD5 each, the whole object none: such batches keep the HEAD."""
        target = self.rclone_target()
        if largest >= RCLONE_UPLOAD_CUTOFF or not self.checks_upload_digests():
            return target
        env = {**target.env, self._remote()[1] + "NO_HEAD": "true"}
        return RcloneTarget(spec=target.spec, env=env, upload_flags=target.upload_flags)

    def checks_upload_digests(self) -> bool:
        """Whether the service refuses a PUT whose body does not match its Content-MD5 (as S3
        does, with BadDigest), asked as rclone uploads (a payload the signature does not cover):
        a presigned PUT of the reserved name `.dlm-digest-check` at the storage's root, signed
        for the MD5 of other bytes. Asked once per process and (endpoint, bucket). A service
        that stores it does not check: the object is deleted and the answer is no. An answer
        that is neither (unreachable, access denied, anything else) is no, and asked again
        after DIGEST_CHECK_RETRY_S."""
        key = (self.endpoint, self.bucket)
        now = time.monotonic()
        with _DIGEST_CHECKS_LOCK:
            known = _DIGEST_CHECKS.get(key)
        if known is not None and (known[0] is not None or now < known[1]):
            return bool(known[0])
        try:
            answer = self._probe_upload_digests()
        except Exception as exc:  # whatever the service answered: no answer, never a failed batch
            log.info("storage %r: cannot tell whether S3 checks upload digests (%s)", self.name, exc)
            answer = None
        with _DIGEST_CHECKS_LOCK:
            _DIGEST_CHECKS[key] = (answer, now + DIGEST_CHECK_RETRY_S)
        return bool(answer)

    def _probe_upload_digests(self) -> bool | None:
        import urllib.error
        import urllib.request

        from lifecycle.settings import get_settings

        url, headers = self.upload_url(DIGEST_CHECK, hashlib.md5(b"not the body").hexdigest(), 300)
        request = urllib.request.Request(url, data=b"the body", headers=headers, method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=get_settings().transfer.contimeout_s):
                pass
        except urllib.error.HTTPError as exc:
            try:
                answer = exc.read(4096).decode("utf-8", "replace")
            except Exception:  # a body that stalls or breaks: no answer
                answer = ""
            if exc.code == 400 and ("<Code>BadDigest<" in answer or "<Code>InvalidDigest<" in answer):
                return True
            log.info("storage %r: cannot tell whether S3 checks upload digests (%s)", self.name, exc.code)
            return None
        log.warning(
            "storage %r: S3 at %s stored an upload whose Content-MD5 was not its body's; "
            "rclone checks each copy to it with a HEAD after the upload",
            self.name,
            self._where(),
        )
        try:
            self.delete(DIGEST_CHECK)
        except DLMError as exc:
            log.warning("storage %r: could not delete the probe %s (%s)", self.name, DIGEST_CHECK, exc)
        return False


# rclone's generic multi-thread upload (used above --multi-thread-cutoff, 256 MiB) leaves a
# multipart object with no MD5 at all, so its copy could only be checked by reading it back.
# The S3 backend's own multipart upload (--multi-thread-streams 0; parts go up
# --s3-upload-concurrency at a time) hashes the source first and stores its MD5 as md5chksum
# metadata, which rclone compares after the copy and `rclone hashsum` reads without
# downloading. It is 10-20% slower here than the multi-thread upload, less than a read-back.
S3_UPLOAD_FLAGS = ("--multi-thread-streams", "0")

# The name of the object checks_upload_digests() tries to upload at the storage's root (a
# service that checks digests refuses it; one that stores it has it deleted at once).
DIGEST_CHECK = ".dlm-digest-check"
# rclone's S3 backend uploads a file of this size or more in parts (pinned in rclone_target's
# remote): no one Content-MD5 covers such an object.
RCLONE_UPLOAD_CUTOFF = 200 * 1024**2
# (endpoint, bucket) -> whether that S3 service refuses an upload whose body is not its
# Content-MD5 (None: it gave no answer), and until when (monotonic) a None stands
_DIGEST_CHECKS: dict[tuple[str | None, str], tuple[bool | None, float]] = {}
DIGEST_CHECK_RETRY_S = 300.0
_DIGEST_CHECKS_LOCK = threading.Lock()


# What stays as is in a metadata value; anything else (non-ASCII, control characters, '%')
# is percent-encoded, as S3 user metadata travels in HTTP headers and must be ASCII.
_META_SAFE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")


def encode_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """User metadata fit for S3: keys and values percent-encoded (UTF-8) where not plain ASCII."""
    from urllib.parse import quote

    return {quote(str(k), safe=_META_SAFE): quote(str(v), safe=_META_SAFE) for k, v in metadata.items()}


def decode_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The inverse of encode_metadata (values without '%' come back unchanged)."""
    from urllib.parse import unquote

    return {unquote(str(k)): unquote(str(v)) for k, v in metadata.items()}


def _md5_of(etag: str, metadata: Mapping[str, str]) -> str | None:
    """The MD5 an object's ETag or rclone's md5chksum metadata gives, if any."""
    etag = etag.strip('"').lower()
    if etag and "-" not in etag and len(etag) == 32:
        return etag
    value = metadata.get(MD5_META)
    if value:
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(value, validate=True)
            if len(raw) == 16:
                return raw.hex()
    return None
