"""schemathesis against the published schema (/api/openapi.json) of a live `dlm api` on a real
PostgreSQL catalogue, with an owner's token and then an admin's: no answer is a 5xx, and every
answer conforms to the schema (its status documented, its body and content type as
described). The generated path parameters are often real (the catalogue's items, storages,
datasets, pipelines), so the fuzzing reaches the core operations, not only the 404s.

Bounded: a fixed seed, a few examples per operation and a time budget per run, so the test
stays under two minutes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import schemathesis  # noqa: F401  (the test extra: a missing package fails here, in CI too)

from devrig.seaweed import SeaweedServer
from lifecycle.catalogue.catalog import create_dataset
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.inputs import DatasetCreate
from lifecycle.catalogue.models import Item
from lifecycle.runs import Pipeline
from tests.api.conftest import Api, Tokens
from tests.dlm_process import prefect_api_url
from tests.factories import ingest_payloads, payload, posix_storage, s3_storage

pytestmark = [pytest.mark.prefect, pytest.mark.s3, pytest.mark.rclone, pytest.mark.postgres]

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)
SECONDS_PER_RUN = 30


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_the_published_schema_holds_under_fuzzing(
    db_url: str,
    api: Api,
    tokens: Tokens,
    tmp_path: Path,
    s3_env: SeaweedServer,
    s3_bucket: str,
    flows_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # POST /runs asks the harness's Prefect server, where no pipeline is served (409)
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url())
    with session_scope() as s:
        posix_storage(s, "disk-a", tmp_path / "disk-a")
        s3_storage(s, "objects", server=s3_env, bucket=s3_bucket)
    names = [f"fuzz/{i}.dat" for i in range(6)]
    oids = ingest_payloads("disk-a", {n: payload(n) for n in names}, staging=tmp_path / "in")
    with session_scope() as s:
        for i, oid in enumerate(oids.values()):
            item = s.get_one(Item, oid)
            item.owner = "alice" if i % 3 else "bob"
            item.meta = {"kind": "raw", "n": i}
            s.add(item)
        create_dataset(DatasetCreate(name="raw", where="meta.kind = 'raw'", owner="alice"), session=s)
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "\n".join(
            [
                "[dictionaries.oids]",
                f"values = {_toml_list([str(o) for o in oids.values()])}",
                "[dictionaries.names]",
                f"values = {_toml_list(['disk-a', 'objects', 'raw'])}",
                "[dictionaries.pipelines]",
                f"values = {_toml_list([p.value for p in Pipeline])}",
                "[parameters]",
                '"path.oid" = { dictionary = "oids", probability = 0.7 }',
                '"path.name" = { dictionary = "names", probability = 0.7 }',
                '"path.pipeline" = { dictionary = "pipelines", probability = 0.7 }',
                "",
            ]
        )
    )
    for who, token in (("alice", tokens.alice), ("admin", tokens.admin)):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(config),
                "--no-color",
                "run",
                f"{api.base}/openapi.json",
                "--header",
                f"Authorization: Bearer {token}",
                "--checks",
                CHECKS,
                "--phases",
                "coverage,fuzzing",
                "--max-examples",
                "15",
                "--max-time",
                str(SECONDS_PER_RUN),
                "--seed",
                "20261202",
                # one worker: hypothesis parses lambdas' source with ast, which CPython 3.11 does
                # not do safely from two threads (SystemError: AST constructor recursion depth)
                "--workers",
                "1",
                "--request-timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=SECONDS_PER_RUN + 60,
            cwd=tmp_path,
            check=False,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"schemathesis as {who} found failures:\n{out[-12000:]}"
        assert "Server error" not in out
        assert " passed" in out and "Operations:" in out, out[-3000:]
