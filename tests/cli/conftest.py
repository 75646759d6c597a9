"""Helpers to run the `dlm` CLI in-process and capture what a user sees."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lifecycle import settings as settings_mod


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def dlm(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run `dlm ARGS...` in-process: returns exit code, stdout and stderr."""
    from dlm import render
    from dlm.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    # the consoles read COLUMNS when dlm.render is first imported, perhaps by an earlier test
    for console in (render.out, render.err):
        monkeypatch.setattr(console, "width", 250)
    monkeypatch.setenv("DLM_OWNER", "tester")

    def run(*args: str) -> Result:
        settings_mod.reset_settings()
        capsys.readouterr()
        code = 0
        try:
            main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
