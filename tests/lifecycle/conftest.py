"""The in-process `dlm` CLI fixture, for core tests that set up as a user does."""

from tests.cli.conftest import dlm  # noqa: F401
