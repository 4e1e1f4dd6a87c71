import os

import pytest


# Nothing in the test suite may reach the Hub: every lookup would otherwise retry for ~20 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    """A local Hub on 127.0.0.1 that huggingface_hub and transformers talk to for the duration of the test."""
    from huggingface_hub import constants, hf_api
    from transformers.utils import hub as transformers_hub

    from hub_server import LocalHubServer

    server = LocalHubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 2)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)
    monkeypatch.setattr(hf_api.api, "endpoint", server.endpoint)
    # transformers keeps one HfApi, made with the endpoint of its first use: make it anew for this server.
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    yield server
    server.stop()
    assert not server.unknown_requests, f"requests the local Hub does not serve: {server.unknown_requests}"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); `pytest -m cuda` runs only these")
