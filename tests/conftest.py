"""Shared test configuration; the testbed's own pytest plugin is loaded via pytest11."""
