"""DLM's domain core, in packages by job (no Prefect, Typer or FastAPI anywhere below).

The foundation is the modules at this level, which any package may import: errors, settings,
states (the StrEnums stored in the database), names (name and path rules), units, checksum,
redact and links (the symbolic-link guard). Above it the packages import downwards only, in
this order (tests/test_architecture.py checks it):

    transfer   everything that runs rclone: binary, process, log parsing, operations
    storage    the backends (posix, S3, rclone remote, memory) behind one protocol
    catalogue  the database: models, sessions, migrations, storages, ingest, items, query, audit
    planning   catalogue snapshot -> policy -> planners -> a Plan of actions, in batches
    apply      carry a plan out: copy, delete (check before delete), settle, catalogue-only actions
    integrity  verify, repair, reconcile with what the storages hold, recover dead runs
"""

__version__ = "0.1.0"
