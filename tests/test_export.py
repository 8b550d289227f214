"""`lrc export OUT --dense -o DIR`: the dense checkpoint an output computes, for plain transformers."""

from __future__ import annotations

import json

import torch
import transformers
import yaml

from tests.conftest import auto_class, file_hashes, lrc_output, probe_input_ids, run_main


def test_dense_export_computes_the_compressed_model(compressed_outputs, tmp_path, capsys):
    """Every architecture: plain transformers loads the export (no lrc layer, no layer map, no modeling code)
    and its outputs are lrc.load's to float32 round-off; compressed layers are back under their own names."""
    for family, out in compressed_outputs.items():
        dense = tmp_path / family
        code, stdout, stderr = run_main(capsys, "export", out, "--dense", "-o", dense, "--json")
        assert code == 0, stderr
        assert json.loads(stdout)["output"] == str(dense)
        config = json.loads((dense / "config.json").read_text())
        assert "quantization_config" not in config and "auto_map" not in config
        assert not list(dense.glob("*.py"))
        assert (dense / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
        compressed_names = json.loads((out / "config.json").read_text())["quantization_config"]
        model = getattr(transformers, auto_class(family)).from_pretrained(str(dense))
        for name in [*compressed_names.get("ranks", {}), *compressed_names.get("sparse", {})]:
            if ".experts." not in name:  # experts are merged back into transformers' fused parameters
                assert type(model.get_submodule(name)).__name__ in ("Linear", "Conv1D"), name
        with torch.no_grad():
            result = model(input_ids=probe_input_ids())
        got = result.logits if hasattr(result, "logits") else result.last_hidden_state
        expected = lrc_output(out)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()), msg=family)


def test_export_refusals_leave_files_alone(compressed_outputs, tmp_path, capsys):
    """Without --dense, onto its own input, into a non-empty folder, or of a dense model: exit 2, one line, nothing changed."""
    out = compressed_outputs["llama"]
    before = file_hashes(out)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, _, stderr = run_main(capsys, "export", out, "-o", tmp_path / "x")
    assert code == 2 and "--dense" in stderr
    code, _, stderr = run_main(capsys, "export", out, "--dense", "-o", out)
    assert code == 2 and "input model" in stderr
    code, _, stderr = run_main(capsys, "export", out, "--dense", "-o", busy)
    assert code == 2 and "not empty" in stderr
    assert (busy / "notes.txt").read_text() == "mine"
    code, _, _ = run_main(capsys, "export", out, "--dense", "-o", tmp_path / "dense")
    assert code == 0
    code, _, stderr = run_main(capsys, "export", tmp_path / "dense", "--dense", "-o", tmp_path / "again")
    assert code == 2 and "already dense" in stderr and not (tmp_path / "again").exists()
    assert file_hashes(out) == before


def test_export_overwrite_replaces_an_earlier_export_only(compressed_outputs, tmp_path, capsys):
    """An export records itself (lrc_export.yaml), so --overwrite may replace it; a look-alike record is refused."""
    out = compressed_outputs["llama"]
    dense = tmp_path / "dense"
    code, _, stderr = run_main(capsys, "export", out, "--dense", "-o", dense)
    assert code == 0, stderr
    assert yaml.safe_load((dense / "lrc_export.yaml").read_text())["exported_from"] == str(out.resolve())
    code, _, stderr = run_main(capsys, "report", dense)
    assert code == 2 and "is an lrc export (a dense checkpoint" in stderr
    first = file_hashes(dense)
    code, _, stderr = run_main(capsys, "export", out, "--dense", "-o", dense)
    assert code == 2 and "not empty" in stderr
    code, _, stderr = run_main(capsys, "export", out, "--dense", "-o", dense, "--overwrite")
    assert code == 0, stderr
    assert file_hashes(dense) == first  # the same bytes again
    (dense / "lrc_export.yaml").write_text("exported_from: somewhere\n")
    code, _, stderr = run_main(capsys, "export", out, "--dense", "-o", dense, "--overwrite")
    assert code == 2 and "not lrc's record of an export" in stderr
