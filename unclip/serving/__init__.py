"""Serving the cascade over HTTP: ``unclip serve`` (Ray Serve)."""
