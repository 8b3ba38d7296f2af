"""Shared fixtures: one set of tiny model files per test session (they are read-only to tests)."""

import pytest

from library.tiny_models import write_tiny_models


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory):
    return write_tiny_models(str(tmp_path_factory.mktemp("tiny_models")))
