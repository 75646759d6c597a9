"""A storage on any remote of the user's rclone config (`remote:path`), driven through rclone."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO, NoReturn, cast

from lifecycle.checksum import checksum_stream, new_hasher
from lifecycle.errors import (
    ConflictError,
    InvalidNameError,
    RootNotFoundError,
    SourceNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from lifecycle.names import validate_name
from lifecycle.transfer.log import RcloneError, error_class, is_not_found, object_info, stderr_message
from lifecycle.transfer.operations import directory_spec, lsjson
from lifecycle.transfer.process import batch_deadline, kill_group, popen, run
from lifecycle.transfer.target import ObjectInfo, RcloneTarget


class _ProcessReader(io.RawIOBase):
    """The stdout of a running rclone as a raw stream; a failed exit raises at end of data."""

    def __init__(self, proc: subprocess.Popen[bytes], errfile: IO[bytes], what: str) -> None:
        self._proc = proc
        self._err = errfile
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        stdout = cast(io.BufferedReader, self._proc.stdout)
        n: int = stdout.readinto(buffer)
        if n == 0 and self._proc.wait() != 0:  # rclone's stall flags bound a stalled read
            self._err.seek(0)
            message = stderr_message(self._err.read())
            cls = error_class(message)
            raise cls(f"{self._what}: {message}")
        return n

    def close(self) -> None:
        if not self.closed:
            if self._proc.poll() is None:
                kill_group(self._proc)
            self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._err.close()
        super().close()


class RcloneStorage:
    """Objects under `remote:path` of the user's rclone configuration (or a remote that
    RCLONE_CONFIG_<REMOTE>_* variables define)."""

    def __init__(self, name: str, root: str) -> None:
        self.name = name
        self.root = root.rstrip("/") if not root.endswith(":") else root
        self.remote = root.partition(":")[0] if ":" in root else ""

    def __repr__(self) -> str:
        return f"RcloneStorage({self.name!r}, {self.root!r})"

    # ----------------------------------------------------------------- plumbing

    def _spec(self, path: str = "") -> str:
        if not path:
            return self.root
        name = validate_name(path, what="path")
        return self.root + name if self.root.endswith(":") else f"{self.root}/{name}"

    def _raise(self, stderr: bytes, path: str | None = None, returncode: int = 1) -> NoReturn:
        message = stderr_message(stderr)
        # rclone's exit codes 3 and 4: directory not found, file not found.
        missing = returncode in (3, 4) or is_not_found(message)
        if "didn't find section in config file" in message or "not found in config" in message:
            raise StorageError(
                f"storage '{self.name}': rclone remote {self.remote!r} is not configured "
                f"(rclone config, or RCLONE_CONFIG_{self.remote.upper()}_TYPE=...)"
            )
        if path is not None and missing:
            raise SourceNotFoundError(f"{path!r} not found on storage '{self.name}'")
        cls = error_class(message)
        if cls is RcloneError and missing:
            raise RootNotFoundError(
                f"storage '{self.name}': root {self.root} does not exist"
                + (f" ({message})" if message else "")
            )
        raise cls(f"storage '{self.name}': {message}")

    def _run(
        self, args: list[str], *, path: str | None = None, input: bytes | None = None, nbytes: int = 0
    ) -> subprocess.CompletedProcess[bytes]:
        """One rclone call, bounded by the stall flags and a deadline for `nbytes` bytes."""
        limit = batch_deadline(files=1, nbytes=nbytes)
        proc = run([*args, "--log-level", "ERROR"], timeout=limit, input=input)
        if proc.returncode != 0:
            self._raise(proc.stderr, path, proc.returncode)
        return proc

    @functools.cached_property
    def features(self) -> Mapping[str, Any]:
        """`rclone backend features` of the root (hashes, PublicLink...). Raises StorageError."""
        proc = self._run(["backend", "features", self.root])
        data = json.loads(proc.stdout or b"{}")
        return data if isinstance(data, dict) else {}

    def _native_md5(self) -> bool:
        """Whether the remote keeps MD5s (rather than computing them by reading, as local does)."""
        feats = self.features.get("Features", {})
        slow = isinstance(feats, dict) and feats.get("SlowHash", False)
        return "md5" in self.features.get("Hashes", []) and not slow

    # ----------------------------------------------------------------- names

    def resolve(self, user_path: str) -> str:
        """The root-relative name of `remote:path/...` inside the root, or of a relative path.
        Raises InvalidNameError."""
        root_prefix = self.root if self.root.endswith(":") else self.root + "/"
        if ":" in user_path.split("/", 1)[0]:
            if not user_path.startswith(root_prefix):
                raise InvalidNameError(f"{user_path!r} is outside storage '{self.name}' (root {self.root})")
            user_path = user_path[len(root_prefix) :]
        try:
            return validate_name(user_path, what="path")
        except InvalidNameError as exc:
            raise InvalidNameError(f"storage '{self.name}': {exc}") from exc

    # ----------------------------------------------------------------- operations

    def check(self) -> None:
        """List the root. Raises StorageError (unknown remote, missing root),
        CredentialsError, StorageUnavailableError."""
        self._run(["lsjson", directory_spec(self.root), "--max-depth", "1"])

    def stat(self, path: str) -> ObjectInfo:
        """Raises SourceNotFoundError, CredentialsError, StorageUnavailableError, StorageError."""
        args = ["lsjson", "--stat", "--metadata", self._spec(path)]
        if self._native_md5():
            args += ["--hash", "--hash-type", "md5"]
        proc = self._run(args, path=path)
        entry = json.loads(proc.stdout)
        if not isinstance(entry, dict) or entry.get("IsDir"):
            raise SourceNotFoundError(f"{path!r} on storage '{self.name}' is not a file")
        info = object_info(entry)
        meta = {k: v for k, v in info.metadata.items() if k not in SYSTEM_METADATA}
        return ObjectInfo(
            path=validate_name(path, what="path"),
            size=info.size,
            mtime=info.mtime,
            checksum=info.checksum,
            checksum_algo=info.checksum_algo,
            metadata=meta,
        )

    def open(self, path: str) -> BinaryIO:
        """A stream of `rclone cat` (close it). Raises SourceNotFoundError at once; a failure
        mid-stream raises StorageError (or a subclass) from read()."""
        self.stat(path)
        errfile = tempfile.TemporaryFile(prefix="dlm-rclone-err-")  # noqa: SIM115 (reader closes)
        proc = popen(
            ["cat", self._spec(path), "--log-level", "ERROR"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errfile,
        )
        return io.BufferedReader(
            _ProcessReader(proc, errfile, f"storage '{self.name}': reading {path!r}"),
            buffer_size=1024 * 1024,
        )

    def put(
        self, path: str, src: Path | BinaryIO, *, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Upload with `rclone copyto --immutable` (a file) or `rclone rcat` (a stream), never
        over an existing object: an object found at the path first is a refusal (rclone has
        no conditional write, so one written between that check and the upload is not seen
        by `rcat`; `copyto --immutable` refuses to replace different bytes). Raises
        ConflictError (the object exists), SourceNotFoundError (src file missing),
        CredentialsError, StorageUnavailableError, StorageError."""
        with contextlib.suppress(SourceNotFoundError):
            self.stat(path)
            raise ConflictError(
                f"{path!r} already exists on storage '{self.name}': DLM never writes over an object"
            )
        meta_args: list[str] = []
        for key, value in (metadata or {}).items():
            meta_args += ["--metadata-set", f"{key}={value}"]
        if meta_args:
            meta_args.insert(0, "--metadata")
        dest = self._spec(path)
        if isinstance(src, Path):
            if not src.is_file():
                raise SourceNotFoundError(f"source file {src} not found")
            self._run(
                ["copyto", str(src), dest, "--checksum", "--immutable", *meta_args],
                nbytes=src.stat().st_size,
            )
        else:
            with tempfile.TemporaryFile(prefix="dlm-rclone-err-") as errfile:
                with popen(
                    ["rcat", dest, "--log-level", "ERROR", *meta_args],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=errfile,
                ) as proc:
                    assert proc.stdin is not None
                    try:
                        shutil.copyfileobj(src, proc.stdin, 1024 * 1024)
                    except BrokenPipeError:
                        pass
                    finally:
                        with contextlib.suppress(BrokenPipeError):
                            proc.stdin.close()
                    try:
                        proc.wait(timeout=batch_deadline(files=1))
                    except subprocess.TimeoutExpired:
                        kill_group(proc)
                        proc.wait()
                        raise StorageUnavailableError(
                            f"storage '{self.name}': the storage stalled: rclone rcat did not finish"
                        ) from None
                if proc.returncode != 0:
                    errfile.seek(0)
                    self._raise(errfile.read(), returncode=proc.returncode)
        return self.stat(path)

    def delete(self, path: str) -> None:
        """`rclone deletefile`; absent is fine. Raises CredentialsError,
        StorageUnavailableError, StorageError."""
        with contextlib.suppress(SourceNotFoundError):
            self._run(["deletefile", self._spec(path)], path=path)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under the directory `prefix` (an absent prefix lists nothing).
        Raises CredentialsError, StorageUnavailableError, StorageError."""
        base = validate_name(prefix, what="path") + "/" if prefix else ""
        target = RcloneTarget(spec=self._spec(prefix))
        native = self._native_md5()
        try:
            for info in lsjson(target, hash=native, hash_types=("md5",)):
                try:
                    name = validate_name(base + info.path, what="path")
                except InvalidNameError:
                    continue
                yield ObjectInfo(
                    path=name,
                    size=info.size,
                    mtime=info.mtime,
                    checksum=info.checksum,
                    checksum_algo=info.checksum_algo,
                )
        except RcloneError as exc:
            if prefix and is_not_found(str(exc)):
                return
            self._raise(str(exc).encode())

    def checksum(self, path: str, algo: str) -> str:
        """Hex digest of the bytes read through `rclone cat`. Raises SourceNotFoundError,
        InvalidValueError, CredentialsError, StorageUnavailableError, StorageError."""

        new_hasher(algo)  # reject an unknown algorithm before starting rclone
        with self.open(path) as stream:
            return checksum_stream(stream, algo)[0]

    def url(self, path: str, expires_s: int = 3600) -> str:
        """A public link from `rclone link`, if the remote makes them. Raises StorageError
        when it cannot, SourceNotFoundError."""
        feats = self.features.get("Features", {})
        if isinstance(feats, dict) and not feats.get("PublicLink", False):
            raise StorageError(
                f"storage '{self.name}': rclone remote {self.remote!r} cannot make links to objects"
            )
        proc = self._run(["link", self._spec(path), "--expire", f"{expires_s}s"], path=path)
        return proc.stdout.decode().strip()

    def rclone_target(self) -> RcloneTarget:
        """The root itself: the remote is in the user's rclone config (or environment)."""
        return RcloneTarget(spec=self.root)


# Metadata rclone reports for local files and S3 objects that is not the user's.
SYSTEM_METADATA = frozenset(
    {
        "atime",
        "mtime",
        "btime",
        "mode",
        "uid",
        "gid",
        "rdev",
        "content-type",
        "content-encoding",
        "content-language",
        "content-disposition",
        "cache-control",
        "tier",
        "md5chksum",
    }
)
