"""Titan Plugin Manager: events in on a Redis stream, sandboxed plugin runs, result events out."""

__version__ = "0.1.0"
