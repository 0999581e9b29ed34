"""Every test gets its own experiment registry: nothing is recorded in the user's real one."""

import pytest


@pytest.fixture(autouse=True)
def _private_registry(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLAUNCH_REGISTRY", str(tmp_path_factory.mktemp("registry") / "registry.sqlite"))
