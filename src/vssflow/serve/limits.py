"""What a server takes (`vssflow-serve`'s options), apart from the application: the command and
Ray Serve's replicas read it without importing the web stack."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_concurrent: int
    batch: int = 1                       # requests whose windows `/v1/generate` batches together
    request_timeout: float | None = None  # seconds from the upload read to the answer's start
    max_seconds: float | None = None     # the longest clip taken
    max_transcript: int | None = None    # the longest transcript taken, in characters
