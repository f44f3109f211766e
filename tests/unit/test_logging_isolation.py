"""A test that configures logging in-process (``cluster.cli.main`` does, for ``migrate`` and
``tenants``) must not leave the root logger writing to that test's captured stderr: pytest
closes it after the test, and every later log record then printed "--- Logging error ---"
with a traceback (tests/conftest.py restores the root logger after each test)."""

from __future__ import annotations

import logging

from core.logs import configure_logging

_before: list[logging.Handler] = []


def test_a_test_that_configures_logging():
    _before[:] = logging.getLogger().handlers
    configure_logging("info", "text")
    logging.getLogger("tests.isolation").info("written to this test's captured stderr")


def test_the_next_test_logs_through_the_handlers_from_before_it():
    root = logging.getLogger()
    assert root.handlers == _before
    for handler in root.handlers:
        assert not getattr(getattr(handler, "stream", None), "closed", False), handler
