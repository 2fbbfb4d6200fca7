"""A short load run (benchmarks/load.py): 4 concurrent gradio_client clients × 20 requests, one in
ten a bad input, against the shared app server. Zero unintended failures (every good request
gives its pair's reference Dice, every bad one the corpus's answer) and bounded memory."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from apphelpers import app_server  # noqa: F401  (a fixture)
from conftest import needs_pipeline

pytestmark = needs_pipeline
pytest.importorskip("gradio_client")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import load  # noqa: E402

CLIENTS, REQUESTS = 4, 20
MAX_GROWTH_MB = 50        # issue 10's bound, there from 1,000 to 3,200 requests


def test_short_load_run(app_server):  # noqa: F811
    rep = load.run(app_server.url, app_server.proc.pid, clients=CLIENTS, requests=REQUESTS,
                   bad_every=10, timeout_s=120, request_timeout_s=30, mark=40, n_examples=4)
    print("\n" + load.table(rep))
    assert rep["completed"] == CLIENTS * REQUESTS, rep
    assert rep["unintended_failures"] == 0, rep["failures"]
    assert rep["bad"] == CLIENTS * REQUESTS // 10 and rep["bad_refused"] > 0
    assert rep["latency_ms"]["p95"] is not None
    m = rep["memory_mb"]
    assert m["start"] and m["after_mark"] and m["end"], m
    assert m["growth_mark_to_end"] <= MAX_GROWTH_MB, m


def test_percentile_and_rss_helpers():
    assert load.percentile([5, 1, 4, 2, 3], 50) == 3
    assert load.percentile(list(range(1, 101)), 95) == 95
    assert load.percentile(list(range(1, 101)), 99) == 99
    assert load.percentile([], 50) is None
    import os
    mb = load.rss_mb(os.getpid())
    assert mb is not None and 10 < mb < 100_000
    assert load.rss_mb(2**22 + 12345) is None       # no such process
