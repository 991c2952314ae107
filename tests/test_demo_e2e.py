"""End to end: the demo's models learn, measured on a smaller synthetic world.

Builds a world of 600 identities and 16 held-out test scenes, trains IdGen, ExpGen and
IdRank with the demo configs and the real training scripts, samples the test renders with
``sample.py`` and requires every check of the report to hold (each a positive paired
effect with a one-sided randomisation test p < 0.05, see ``ofer.eval.world``): the ranked
identity beats the average sample and the mean shape, the error grows under occlusion and
the expression samples spread when the mouth is covered. Untrained or uninformed models
fail these checks (``tests/test_demo_learning.py`` builds such cases). A few minutes on a
2-core CPU.
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow


def test_demo_models_learn_on_a_smaller_world(tmp_path, capsys):
    from ofer.demo import main

    root = tmp_path / "demo"
    assert main(["--root", str(root), "--identities", "600", "--test-scenes", "16"]) == 0
    s = json.loads((root / "report.json").read_text())["summary"]
    assert s["images"] == 48 and s["scenes"] == 16 and s["occlusion_pairs"] == 16
    failed = {k: v for k, v in s.items() if k.endswith("_p")}
    assert all(s["checks"].values()), (s["checks"], failed)
    assert s["ranked_error_mm"] < s["mean_sample_error_mm"] < s["mean_shape_error_mm"] + 0.5

    # a re-run reuses the world, the three runs and every sample; only the report is redone
    ckpt = root / "idgen" / "checkpoints" / "latest.pt"
    npz = sorted((root / "samples").glob("*/samples.npz"))
    assert len(npz) == 48
    stamp = [p.stat().st_mtime_ns for p in [ckpt, *npz]]
    capsys.readouterr()
    assert main(["--root", str(root), "--identities", "600", "--test-scenes", "16"]) == 0
    out = capsys.readouterr().out
    assert "world: built before" in out and out.count("trained before") == 3
    assert [p.stat().st_mtime_ns for p in [ckpt, *npz]] == stamp
    # another world size on the same folder is refused, not silently reused
    with pytest.raises(SystemExit, match="holds a world of 600 identities and 16 test scenes, not 500"):
        main(["--root", str(root), "--identities", "500", "--test-scenes", "16"])
    assert os.path.isfile(root / "report.md")
