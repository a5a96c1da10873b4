"""The runc-compatible runtime CLI, isobox-runtime."""
