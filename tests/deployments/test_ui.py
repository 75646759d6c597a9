"""The Prefect UI of a server DLM started on a non-default port, in a real headless browser.

Debian's `chromium` (or DLM_TEST_CHROMIUM), driven by playwright with that executable (no
browser download): the `browser` fixture of tests/conftest.py. In CI a missing chromium or
playwright is a failure, not a skip. The screenshots are saved under the test's tmp dir and
their paths printed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from devrig.prefect_server import PrefectServer
from tests.deployments.conftest import SERVED, api, deployment_names, poll, run, start_serve, stop_serve

pytestmark = pytest.mark.prefect

PAGE_TIMEOUT_MS = 60_000
NOWHERE = "http://127.0.0.1:9/api"


def test_ui_lists_dlm_deployments_and_renders_a_run_table(
    prefect_server: PrefectServer, browser: Any, tmp_path: Path
) -> None:
    url = prefect_server.url
    assert not url.endswith(":4200/api")
    # the UI asks the API at the address the server was started on
    assert api(url.removesuffix("/api"), "/ui-settings", method="GET")["api_url"] == url

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "PREFECT_"))}
    env.update(
        DLM_HOME=str(tmp_path / "home"),
        DLM_OWNER="tester",
        PREFECT_HOME=str(tmp_path / "client-prefect"),
        **prefect_server.client_env(),
    )
    for name in ("ui-src", "ui-dst"):
        (tmp_path / name).mkdir()
        run(env, "storage", "add", name, "--kind", "posix", "--root", str(tmp_path / name))
    # DLM's deployments, registered the way `dlm serve` does
    log = tmp_path / "serve.log"
    serve = start_serve(env, log, "--no-server")
    try:
        poll("dlm serve's deployments", lambda: deployment_names(url) >= SERVED, 120, log)
    finally:
        assert stop_serve(serve) == 0, log.read_text()
    # one flow run that publishes a table artifact: a replicate run that copies one file
    (tmp_path / "ui-src" / "ui" / "frame.bin").parent.mkdir(parents=True)
    (tmp_path / "ui-src" / "ui" / "frame.bin").write_bytes(os.urandom(4096))
    run({**env, "PREFECT_API_URL": NOWHERE}, "ingest", "--storage", "ui-src",
        str(tmp_path / "ui-src" / "ui" / "frame.bin"), "--phase", "LIQUID")  # fmt: skip
    report = json.loads(run(env, "run", "replicate", "--json").stdout)
    assert report["copied"] == 1, report
    (artifact,) = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["dlm-replicate-actions"]}}})
    assert artifact["type"] == "table"

    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    shots: list[Path] = []

    page.goto(f"{prefect_server.ui}/deployments")
    for name in ("replicate-on-ready", "rebalance", "migrate", "verify"):
        page.get_by_text(name, exact=True).first.wait_for()
    shots.append(tmp_path / "deployments.png")
    page.screenshot(path=str(shots[-1]), full_page=True)

    # the run's page lists its artifacts; the table artifact's page renders the batches
    page.goto(f"{prefect_server.ui}/runs/flow-run/{artifact['flow_run_id']}")
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("dlm-replicate-actions", exact=True).first.wait_for()
    shots.append(tmp_path / "flow-run-artifacts.png")
    page.screenshot(path=str(shots[-1]), full_page=True)
    page.get_by_text("dlm-replicate-actions", exact=True).first.click()
    page.wait_for_url(f"**/artifacts/artifact/{artifact['id']}")
    table = page.locator("table").first
    table.wait_for()
    table.locator("td", has_text="ui-dst").first.wait_for()
    headers = [h.strip() for h in table.locator("th").all_inner_texts()]
    assert {"kind", "from", "to", "done", "failed"} <= set(headers), headers
    cells = table.locator("td").all_inner_texts()
    assert "ui-src" in cells and "ui-dst" in cells and "copy" in cells, cells
    shots.append(tmp_path / "artifact.png")
    page.screenshot(path=str(shots[-1]), full_page=True)
    page.close()
    for shot in shots:
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
