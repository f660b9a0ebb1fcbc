"""The `cluster` fixture: a real `picloud up` for one test (see picloud_cluster.py)."""

import os
import tempfile

import pytest

from picloud_cluster import Cluster


@pytest.fixture
def cluster():
    with tempfile.TemporaryDirectory(prefix="picloud-py-") as d:
        os.chmod(d, 0o755)
        c = Cluster(d)
        try:
            yield c
        finally:
            c.stop()
