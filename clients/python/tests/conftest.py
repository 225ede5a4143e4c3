import os

import pytest

import idemd_client
from helpers import Idemd


def pytest_report_header(config):
    # Which copy of the client the tests exercise: scripts/test runs them against an installed wheel.
    return f"idemd_client from {os.path.dirname(idemd_client.__file__)}"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One idemd for the whole session; every test uses keys of its own."""
    idemd = Idemd(str(tmp_path_factory.mktemp("idemd")))
    yield idemd
    idemd.stop()
