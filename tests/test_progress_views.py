"""The notebook view's life over several calls, on the ``local`` provider: one display per
call, a summary that says when a call stopped early, and nothing shown between calls."""

from __future__ import annotations

import pytest
from displays import Shown
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud.client import registry


def _maybe_fail(i):
    if i == 7:
        raise ValueError("task 7 fails")
    return i


def test_each_call_gets_a_display_ending_in_its_summary(monkeypatch):
    shown = Shown().install(monkeypatch)
    settings = {"provider": "local", "n": 2, "cluster": "views", "workers_per_host": 1}
    try:
        with parallel_backend("cloud", **settings):
            assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(10)) == list(range(10))
            first = shown.bundles[-1]["text/plain"]
            assert first.startswith("joblib-cloud: 10 tasks in "), first
            assert first.endswith(" of 2 hosts")  # local: no money
            assert shown.displays == 1
            with pytest.raises(ValueError, match="task 7 fails"):
                Parallel(n_jobs=-1, batch_size=1)(delayed(_maybe_fail)(i) for i in range(20))
        stopped = shown.bundles[-1]
        assert shown.displays == 2
        assert stopped["text/plain"].startswith("joblib-cloud: stopped after "), stopped
        assert "&#10007;" in stopped["text/html"] and "stopped after <b>" in stopped["text/html"]
        after = len(shown.bundles)
        with parallel_backend("cloud", **settings):
            Parallel(n_jobs=-1)(delayed(abs)(i) for i in range(4))
        assert shown.displays == 3 and len(shown.bundles) > after
        assert shown.bundles[-1]["text/plain"].startswith("joblib-cloud: 4 tasks in ")
    finally:
        registry.close_all()
