"""`lrc report --json` and `--plot`: the report as JSON, and a picture of where the parameters went."""

from __future__ import annotations

import json
import os
import re

import matplotlib.image
import numpy as np
import pytest
import yaml

from lrc.cli import main
from lrc.report_plot import kept_grid


def run(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_is_the_yaml_report(capsys, compressed_run):
    code, out, err = run(capsys, "report", compressed_run.out, "--json")
    assert code == 0, err
    report = yaml.safe_load((compressed_run.out / "lrc_report.yaml").read_text())
    assert json.loads(out) == json.loads(json.dumps(report))
    assert "per matrix" in err  # the tables, on stderr


def test_plot_writes_a_png(capsys, compressed_run, tmp_path):
    path = tmp_path / "report.png"
    code, out, err = run(capsys, "report", compressed_run.out, "--plot", path)
    assert code == 0, err
    assert f"wrote {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert image[..., :3].std() > 0.1  # not a blank canvas
    assert not list(tmp_path.glob(".report.png*"))  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file of the user's


def test_heat_map_cells_are_the_kept_fractions(compressed_run):
    report = yaml.safe_load((compressed_run.out / "lrc_report.yaml").read_text())
    layers, types, kept, kinds = kept_grid(report)
    assert layers == [0, 1]
    assert types == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for layer in report["layers"]:
        index = int(layer["name"].split(".")[2])
        col = types.index(layer["name"].split(".", 3)[3])
        m, n = layer["shape"]
        assert kept[index, col] == layer["params"] / (m * n)
        assert (kinds[index, col] == "dense") == (layer["rank"] == "dense")
    assert not np.isnan(kept).any()


def test_report_carries_the_allocation_curve(compressed_run):
    report = yaml.safe_load((compressed_run.out / "lrc_report.yaml").read_text())
    curve = report["allocation_curve"]
    kept, errors = curve["kept_fraction"], curve["error"]
    assert kept == [round(0.05 * i, 2) for i in range(1, 21)] and errors[-1] == 0.0
    finite = [e for e in errors if e is not None]
    assert finite == sorted(finite, reverse=True)  # more bytes never cost more error
    chosen = curve["chosen"]
    assert chosen["kept_fraction"] == pytest.approx(1 - report["params"]["targeted"]["removed_fraction"], abs=1e-4)
    # the run's allocation is optimal: the least error within fewer bytes is no smaller than the run's, within
    # more bytes no larger
    below = [e for k, e in zip(kept, errors) if k < chosen["kept_fraction"] and e is not None]
    above = [e for k, e in zip(kept, errors) if k >= chosen["kept_fraction"] + 0.01]
    assert all(e >= chosen["error"] for e in below) and all(e <= chosen["error"] for e in above)
    assert report["timing_s"]["allocation_curve_s"] >= 0


@pytest.mark.parametrize(("name", "message"), [
    ("notes.txt", "cannot draw to {path}: unknown image type '.txt' (use .png, .svg or .pdf)"),
    ("missing/report.png", "cannot write {path}: folder {parent} does not exist"),
])
def test_plot_refuses_bad_paths_and_keeps_files(capsys, compressed_run, tmp_path, name, message):
    path = tmp_path / name
    (tmp_path / "notes.txt").write_text("my notes")
    code, out, err = run(capsys, "report", compressed_run.out, "--plot", path)
    assert code == 2
    assert err == "error: " + message.format(path=path, parent=path.parent) + "\n"
    assert (tmp_path / "notes.txt").read_text() == "my notes"


def test_plot_without_matplotlib_says_what_to_install(capsys, compressed_run, tmp_path, monkeypatch):
    import sys

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    code, out, err = run(capsys, "report", compressed_run.out, "--plot", tmp_path / "r.png")
    assert (code, err) == (2, "error: --plot needs matplotlib, which is not installed: pip install 'lrc[plot]'\n")
    assert not (tmp_path / "r.png").exists()


def test_a_missing_folder_is_not_found(capsys, tmp_path):
    code, _, err = run(capsys, "report", tmp_path / "nothere")
    assert (code, err) == (2, f"error: not found: {tmp_path / 'nothere'}\n")


def test_a_cache_hit_is_said_not_timed(capsys, compressed_run, tmp_path):
    # timing_s carries cache_hit: 1.0 as a flag; the table says where the statistics came from instead of "1.0s"
    import shutil

    out = shutil.copytree(compressed_run.out, tmp_path / "out")
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    report["timing_s"] = {"cache_hit": 1.0, **report["timing_s"]}
    (out / "lrc_report.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the table's cells wrapped, joined
    assert "cache_hit" not in text and "statistics read from the cache" in text


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_plot_replaces_only_its_own_picture(capsys, compressed_run, tmp_path, suffix):
    path = tmp_path / f"report{suffix}"
    path.write_bytes(b"the user's own picture")
    code, out, err = run(capsys, "report", compressed_run.out, "--plot", path)
    assert code == 2 and "exists and is not a picture lrc report drew" in err
    assert path.read_bytes() == b"the user's own picture"
    path.unlink()
    for _ in range(2):  # drawn, then drawn again over its own picture
        code, out, err = run(capsys, "report", compressed_run.out, "--plot", path)
        assert code == 0, err
    assert path.stat().st_size > 1000


@pytest.mark.parametrize(("damage", "message"), [
    (lambda r: r["layers"][0].update(shape=None), "is not a valid lrc report: layers[0] lacks a name, kind, shape"),
    (lambda r: r.update(layers=r["layers"][:3]), "is incomplete or edited: its 3 layers hold"),
    (lambda r: r.pop("bytes"), "is incomplete or edited: it has no bytes"),
])
def test_a_damaged_or_cut_report_is_not_shown_as_whole(capsys, compressed_run, tmp_path, damage, message):
    import shutil

    out = shutil.copytree(compressed_run.out, tmp_path / "out")
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    damage(report)
    (out / "lrc_report.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    for extra in ([], ["--json"]):
        code, stdout, err = run(capsys, "report", out, *extra)
        assert code == 2 and message in err and stdout == ""


def test_an_80_column_table_shortens_names_never_numbers(compressed_run):
    from rich.console import Console

    from lrc.report_view import render_report

    report = yaml.safe_load((compressed_run.out / "lrc_report.yaml").read_text())
    report["layers"][0]["name"] = "model.layers.0.self_attn.a_projection_name_far_longer_than_any_column"
    console = Console(width=80, record=True, color_system=None)
    render_report(report, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = [line for line in text.splitlines() if re.search(r" \d+x\d+ ", line)]  # the per-matrix rows, in order
    assert len(rows) == len(report["layers"])
    for layer, row in zip(report["layers"], rows):
        m, n = layer["shape"]
        for figure in (f"{m}x{n}", f"{layer['params']:,}", f"{layer['rel_error']:.3f}", f"{layer['params'] / (m * n):.0%}"):
            assert figure in row
    assert "self_attn.a_proj" in text and "…" in text  # the long name shortened
