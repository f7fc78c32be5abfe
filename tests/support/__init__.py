"""Helpers shared by the test modules: real servers, Redis, configs, clients and cache probes.

Test modules import from here, never from `tests.conftest` or from each other; conftest.py
holds the fixtures and builds them from these helpers.
"""
