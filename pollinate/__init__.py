"""Pollinate: the composition layer (one console script over every room's CLI)."""

__version__ = "0.1.0"
