"""Shared fixtures: one set of tiny model files per test session (they are read-only to tests), and the tiny
FLUX.1-dev DiT loaded from them once per test module."""

import pytest

from library.tiny_models import write_tiny_models


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory):
    return write_tiny_models(str(tmp_path_factory.mktemp("tiny_models")))


@pytest.fixture(scope="module")
def dev(tiny_model_files):
    """The tiny FLUX.1-dev DiT in fp32, loaded once per test module."""
    import torch

    from library.flux_utils import load_flow_model

    _, model = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    return model


@pytest.fixture(scope="module")
def dev_file(tiny_model_files, dev):
    """(path, model) of the tiny FLUX.1-dev DiT: the session's file and the model loaded from it."""
    return tiny_model_files.flux_dev, dev


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA stream and event API faked on a CPU machine, recording what is waited on and recorded."""
    from tests.cuda_fakes import install_fake_cuda

    return install_fake_cuda(monkeypatch)
