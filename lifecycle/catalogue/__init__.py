"""The catalogue database and the operations on it.

Owns the table models (models), the input models every edge validates through (inputs, with
StorageCreate in models) and the output models every listing prints (public, with StoragePublic
in models), engines, sessions and migrations
(db, sql, migrations/), the storage registry (storages), ingest of new items (ingest), bulk
registration from a list (bulk, bulk_sources, bulk_writers), item and dataset operations and
status (catalog), the filter language (query, query_parse, query_sql), metadata rules
(metadata) and the event log (audit).

May import the foundation, lifecycle.transfer and lifecycle.storage (ingest uploads the bytes).
"""
