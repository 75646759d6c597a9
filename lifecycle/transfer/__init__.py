"""Everything that runs rclone: finding the binary, running it with bounded waits, reading its
JSON log, and the batch operations (copy, move, delete, list, hashsum) with one process per batch.

May import the foundation (lifecycle/*.py) only. Storage backends build on it, not the reverse:
`RcloneTarget` (how rclone reaches a root) and `ObjectInfo` live here, in `target`.
"""
