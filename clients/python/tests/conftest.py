import os
import pathlib

import pytest

import idemd_client
from helpers import HERE, Idemd


def pytest_report_header(config):
    return f"idemd_client from {os.path.dirname(idemd_client.__file__)}"


def pytest_sessionstart(session):
    # scripts/test runs the suite against a wheel installed into a fresh environment: make sure that is what
    # was imported, not this folder's sources.
    if os.environ.get("IDEMD_PY_EXPECT_INSTALLED") == "1":
        source = pathlib.Path(idemd_client.__file__).resolve()
        if HERE.parent in source.parents or "site-packages" not in source.parts:
            raise pytest.UsageError(f"idemd_client was imported from {source}, not from an installed wheel")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One idemd for the whole session; every test uses keys of its own."""
    idemd = Idemd(str(tmp_path_factory.mktemp("idemd")))
    yield idemd
    idemd.stop()
