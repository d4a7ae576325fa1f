"""studio.models: which models may load, and the model cache."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from ilvr.loading import ModelLoadError  # noqa: E402
from ilvr.registry import DEFAULT_MODEL  # noqa: E402
from studio import models as M  # noqa: E402


def test_model_source():
    assert M.model_source(DEFAULT_MODEL, "") == DEFAULT_MODEL
    assert M.model_source(DEFAULT_MODEL, "  '/tmp/x.pt' ") == "/tmp/x.pt"
    assert M.model_source(None, None) == DEFAULT_MODEL


def test_model_paths_can_be_switched_off_and_are_off_on_spaces():
    assert M.model_paths_allowed({}) and M.model_paths_allowed({"ILVR_ALLOW_MODEL_PATHS": "1", "SYSTEM": "spaces"})
    assert not M.model_paths_allowed({"SYSTEM": "spaces"})
    for off in ("0", "false", "No", " off ", "disable"):  # a typo must not open the box on a public Space
        assert not M.model_paths_allowed({"ILVR_ALLOW_MODEL_PATHS": off, "SYSTEM": "spaces"})
    assert M.model_paths_allowed({"ILVR_ALLOW_MODEL_PATHS": "Yes", "SYSTEM": "spaces"})
    assert M.model_source(DEFAULT_MODEL, "", allow_paths=False) == DEFAULT_MODEL
    assert M.model_source("cat-256 (Google DDPM, EMA)", None, allow_paths=False) == "cat-256 (Google DDPM, EMA)"
    for choice, path in [(DEFAULT_MODEL, "/root"), (DEFAULT_MODEL, "/etc/passwd"), (DEFAULT_MODEL, "/no/such.pt"),
                         ("some-user/any-repo", "")]:  # the same answer whether the path exists or not
        with pytest.raises(ModelLoadError, match=r"only loads the models in the list \(ILVR_ALLOW_MODEL_PATHS"):
            M.model_source(choice, path, allow_paths=False)


def test_model_cache_reuses_and_reloads(tiny_checkpoint):
    calls = []

    def loader(source, device, dtype, check=None):
        from ilvr.loading import load_model

        calls.append(source)
        return load_model(source, device=device, dtype=dtype)

    cache = M.ModelCache(max_models=1, device="cpu", loader=loader)
    a = cache.get(str(tiny_checkpoint))
    assert cache.get(str(tiny_checkpoint)) is a and len(calls) == 1
    weights = tiny_checkpoint / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # re-exported checkpoint
    assert cache.get(str(tiny_checkpoint)) is not a and len(calls) == 2
    assert cache.seconds_per_image_step(a) > 0


def test_model_cache_remembers_failures_briefly():
    calls = []

    def loader(source, device, dtype, check=None):
        calls.append(source)
        raise ModelLoadError("offline")

    cache = M.ModelCache(loader=loader, retry_after_s=60)
    for _ in range(3):
        with pytest.raises(ModelLoadError, match="offline"):
            cache.get("someone/some-model")
    assert calls == ["someone/some-model"]
    with pytest.raises(ModelLoadError, match="pick a model"):
        cache.get("  ")
