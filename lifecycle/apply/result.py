"""What one applied batch did: files moved, bytes, failures, for the run report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lifecycle.reports import BatchRow

# --------------------------------------------------------------------------- results


@dataclass
class BatchResult:
    """What one batch did, for the run's summary and artifact."""

    kind: str
    src: str | None
    dst: str | None
    planned: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0
    duration_s: float = 0.0
    # seconds spent per stage (slots: waiting for storage slots; claim, rclone, verify, settle)
    # for copies; confirm for deletes
    stages: dict[str, float] = field(default_factory=dict)
    read_bytes: int = 0  # deletes: bytes of surviving copies re-hashed by the pre-delete check
    errors: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> BatchRow:
        return BatchRow(
            kind=self.kind,
            from_=self.src or "-",
            to=self.dst or "-",
            planned=self.planned,
            done=self.done,
            failed=self.failed,
            skipped=self.skipped,
            bytes=self.bytes,
            bytes_read_to_confirm=self.read_bytes if self.kind == "delete" else None,
            seconds=round(self.duration_s, 2),
            stages={k: round(v, 2) for k, v in self.stages.items()},
            first_error=next(iter(self.errors.values()), ""),
        )
