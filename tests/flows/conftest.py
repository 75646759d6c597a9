"""The in-process `dlm` CLI fixture, for flow tests that drive DLM as a user does."""

from tests.cli.conftest import dlm  # noqa: F401
