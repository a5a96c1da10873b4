"""Pydantic models of the documents isobox reads and writes, and pure conversions."""
