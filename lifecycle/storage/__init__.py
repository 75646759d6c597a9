"""Storage backends behind one interface: posix, S3 (boto3), any rclone remote, and memory (tests)."""

from lifecycle.storage.base import ObjectInfo, StorageBackend, backend_for

__all__ = ["ObjectInfo", "StorageBackend", "backend_for"]
