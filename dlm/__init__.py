"""The edges people touch: the `dlm` command line (and later the REST API and dashboards)."""
