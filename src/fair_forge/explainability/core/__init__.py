"""Value types and records: pydantic and numpy only; no torch, no I/O, no display (see docs/architecture.md)."""
