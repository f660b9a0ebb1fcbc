"""Test setup: the in-tree ``picloud`` package, and segment files in /dev/shm."""

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(TESTS_DIR)
for _d in (PYTHON_DIR, TESTS_DIR):
    if _d not in sys.path:
        sys.path.insert(0, _d)

import shmfiles  # noqa: E402


@pytest.fixture
def shm():
    """Creates segment files (picloud-test-<pid>-<n>), removed after the test."""
    s = shmfiles.Shm()
    try:
        yield s
    finally:
        s.cleanup()


def pytest_sessionfinish(session, exitstatus):
    # Whatever happened, nothing of ours stays in /dev/shm.
    shmfiles.remove_leftovers()
