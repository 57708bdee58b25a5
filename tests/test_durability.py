"""Crash trials: SIGKILL the engine process at random moments; recover loses and repeats nothing committed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from trials import reference, trial


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_9_at_random_moments_then_recover(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    expected = reference(tmp_path / "reference")
    killed_mid_run = 0
    for n in range(6):
        result = trial(tmp_path / f"trial{n}", rng.uniform(0.1, 0.7), expected)
        killed_mid_run += not result.finished_before_kill
        assert result.reruns_of_succeeded == [], f"trial {n}: committed steps ran again: {result}"
        assert result.lost == [], f"trial {n}: committed steps lost: {result}"
        assert result.integrity == "ok", f"trial {n}: {result.integrity}"
        assert result.data_matches, f"trial {n}: final data differs from an uninterrupted run's"
    assert killed_mid_run >= 3  # most trials really interrupted a run
