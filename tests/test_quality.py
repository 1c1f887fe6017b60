"""bench/quality.py's goals: the thresholds it judges each recorded row by."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def test_beating_random_init_means_more_than_twice_the_knn_noise():
    # binomial std of 67% over 5000 test images: 0.665 points
    assert quality.noise_points(0.67, 5000) == pytest.approx(1.330, abs=1e-3)
    assert not quality.goal_met("dino", 1.2, 60.0, 0.67, 5000)
    assert quality.goal_met("dino", 1.4, 60.0, 0.67, 5000)
    assert quality.goal_met("mae", 5.0, 500.0, 0.669, 5000)


def test_issue8_methods_need_five_points_within_ten_cpu_minutes():
    assert not quality.goal_met("byol", 4.9, 60.0, 0.788, 10000)
    assert quality.goal_met("byol", 5.0, 600.0, 0.788, 10000)
    assert not quality.goal_met("byol", 6.0, 601.0, 0.788, 10000)


def test_table_rejudges_recorded_rows():
    row = dict(method="mae", arch="vit_tiny", steps=1, batch=1, knn_sizes="5000/5000",
               knn_random=0.669, knn_trained=0.679, gain_points=1.0, cpu_s=1.0, wall_s=1.0)
    # +1.0 passed an older, laxer goal; the table judges it by today's (+1.3): NO
    assert quality.table([row]).splitlines()[-1].endswith("| NO |")
