"""The `dlm` command line: parses arguments, calls the lifecycle core, renders (the REST API is in api/)."""
