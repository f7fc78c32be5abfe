"""Slow demo upstream services over plain HTTP, so demos, tests and benchmarks need no network."""

from __future__ import annotations
