"""Integrity: verify replicas by their bytes (verify), copy fresh replicas for corrupted or
lost ones (repair), reconcile the catalogue with what a storage really holds (reconcile) and
settle rows a dead run left in flight (recovery).

May import every other core package (it reuses apply's settle and confirm).
"""
