"""Fixtures shared with the top-level tests: the tiny corpus of test_sekd, for test_experiments."""

from test_sekd import tiny_corpus  # noqa: F401 (a pytest fixture, found by name)
