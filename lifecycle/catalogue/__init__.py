"""The catalogue database and the operations on it.

Owns the table models and their Create/Public models (models), engines, sessions and migrations
(db, sql, migrations/), the storage registry (storages), ingest of new items (ingest), bulk
registration from a list (bulk, bulk_sources, bulk_writers), item and dataset operations and
status (catalog), the filter language (query, query_parse, query_sql), metadata rules
(metadata) and the event log (audit).

May import the foundation, lifecycle.transfer and lifecycle.storage (ingest uploads the bytes).
"""
