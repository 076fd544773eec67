"""Helpers for tests/test_server.py: a real `pollinate serve` subprocess and a filled store."""
