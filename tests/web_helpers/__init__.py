"""Helpers for the real-browser tests of the web client (tests/test_web_client.py)."""
