"""Helpers shared by tests: real servers on loopback."""
