"""DLM's REST API: an edge over the lifecycle core, like the `dlm` CLI (served by `dlm api`).

Every request carries a bearer token (lifecycle.catalogue.tokens); an owner's token sees only
its own items and datasets, an admin's sees everything. The rules are the core's input
models, the answers its output models; errors are one JSON line, never a traceback.
"""
