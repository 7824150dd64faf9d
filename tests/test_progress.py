"""The progress line: no rate before there is one to show, then steps/s and an ETA."""

import io

from rareret.progress import Progress


def test_rate_and_eta_appear_once_measured(monkeypatch):
    clock = iter([10.0, 12.0])
    monkeypatch.setattr("rareret.progress.time.perf_counter", lambda: next(clock))
    stream = io.StringIO()
    progress = Progress(100, stream=stream, interval=0)
    progress.update(10)  # The first update carries compilation: no rate yet.
    progress.update(30, "extra")  # 20 steps in 2 s; 70 left.
    first, second = stream.getvalue().splitlines()
    assert "? steps/s  ETA ?" in first and "nan" not in first
    assert "30/100 steps" in second and "10.0 steps/s" in second
    assert "ETA 0:00:07  extra" in second
