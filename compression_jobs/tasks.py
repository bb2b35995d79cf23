"""Compression tasks (being written)."""
