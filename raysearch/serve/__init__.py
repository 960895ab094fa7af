"""Serve stage: a trained ensemble behind HTTP (Ray Serve), bound to localhost by default."""
