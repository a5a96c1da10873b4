"""The docker-like ``isobox`` command line."""
