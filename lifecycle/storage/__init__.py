"""Storage backends behind one interface: posix, S3 (boto3), any rclone remote, and memory (tests).

Owns the StorageBackend protocol (base), the backends and the factory from a catalogue row
(backends). May import the foundation modules (lifecycle/*.py) and lifecycle.transfer (the
rclone backend runs rclone; ObjectInfo and RcloneTarget live there); the catalogue model only
for typing. Imports nothing from catalogue, planning, apply or integrity at run time.
"""
