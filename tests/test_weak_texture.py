"""A weakly textured generated class is localized, end to end, on small data.

06PlainAnt (three large regions of muted colour: few keypoints for PnP) at 128 px, through ``python run.py``
with the defaults' localization, refinement and recovery and enough splat steps for the recovery to
render a usable object. Every test image must end up localized (path "pnp" or "recovered"), most within
a degree of the true pose.
"""

import pytest

from small_runs import run_small_class  # tests/small_runs.py

pytestmark = pytest.mark.slow


def test_a_weakly_textured_class_is_localized(tmp_path):
    poses = run_small_class("06PlainAnt", tmp_path)["final_poses"]
    assert poses["paths"]["failed"] == 0, poses["paths"]
    assert poses["within_1deg_rate"] >= 0.8, {k: v for k, v in poses.items() if k != "per_query"}
    assert poses["median_rotation_error_deg"] <= 0.6, {k: v for k, v in poses.items() if k != "per_query"}
