import pytest


@pytest.fixture(autouse=True)
def _engine_cache(tmp_path, monkeypatch):
    """Each test builds its engines in a cache of its own, not the user's ~/.cache/densenet/engines."""
    monkeypatch.setenv("DENSENET_ENGINE_CACHE", str(tmp_path / "engine-cache"))
