"""Tests of lifecycle.storage: the posix, S3 and memory backends."""
