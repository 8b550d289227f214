"""The quality benchmark's curve, redrawn from a results YAML (`bench/quality_plot.py`)."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image

from .conftest import REPO, lrc_env


def test_quality_curve_from_results_yaml(tmp_path):
    results = tmp_path / "quality_128.yaml"
    results.write_bytes((REPO / "bench" / "results" / "quality_128.yaml").read_bytes())
    done = subprocess.run([sys.executable, str(REPO / "bench" / "quality_plot.py"), str(results)],
                          env=lrc_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    png = tmp_path / "quality_128.png"
    assert done.stdout.strip() == f"wrote {png}"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 400 and image[..., :3].std() > 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quality_128.png", "quality_128.yaml"]
