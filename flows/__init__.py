"""Prefect flows: one per pipeline; each plans, then applies in batches."""

from lifecycle.redact import install_log_redaction

# Flows also run in Prefect workers that never pass through the CLI: their log records are
# redacted (a URL's password becomes ***) from the moment the flows are imported.
install_log_redaction()
