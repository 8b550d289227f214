"""`lrc eval --json` and the quality gate: exit 0 within --max-ratio, exit 3 with one line above it."""

from __future__ import annotations

import json

import pytest
import yaml

from lrc.cli import main
from lrc.cli.exit_codes import QUALITY_GATE_FAILED


def run(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def eval_args(compressed_run):
    return ["eval", compressed_run.out, "--data", compressed_run.calib, "--seq-len", 64, "--windows", 2,
            "--baseline", compressed_run.model]


@pytest.fixture(scope="module")
def measured(compressed_run, eval_args, tmp_path_factory):
    """The --json results of one eval against the baseline, and the -o YAML it wrote."""
    path = tmp_path_factory.mktemp("eval") / "results.yaml"
    from ..conftest import run_lrc

    result = run_lrc(*eval_args, "--json", "-o", path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), yaml.safe_load(path.read_text()), result.stderr


def test_json_matches_the_yaml_and_the_api(measured, compressed_run):
    import lrc

    data, written, stderr = measured
    assert data == written
    model, baseline = data["results"]
    assert [model["model"], baseline["model"]] == [str(compressed_run.out), str(compressed_run.model)]
    assert data["perplexity_ratio"] == model["perplexity"] / baseline["perplexity"]
    direct = lrc.evaluate(str(compressed_run.out), str(compressed_run.calib), seq_len=64, windows=2)
    assert model["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert model["params"] == direct["params"] < baseline["params"]
    assert data["gate"] is None
    assert "perplexity ratio" in stderr  # the table went to stderr


def test_gate_passes_within_the_ratio(capsys, measured, eval_args):
    ratio = measured[0]["perplexity_ratio"]
    code, out, err = run(capsys, *eval_args, "--max-ratio", ratio * 1.001, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["gate"] == {"max_ratio": pytest.approx(ratio * 1.001), "ratio": pytest.approx(ratio, rel=1e-6),
                            "passed": True}
    assert "quality gate passed" in err and "error" not in err


def test_gate_fails_above_the_ratio_with_one_line(capsys, measured, eval_args, tmp_path):
    ratio = measured[0]["perplexity_ratio"]
    limit = round(ratio * 0.99, 4)
    path = tmp_path / "gate.yaml"
    code, out, err = run(capsys, *eval_args, "--max-ratio", limit, "-o", path)
    assert code == QUALITY_GATE_FAILED == 3
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [err.splitlines()[-1]]
    assert errors[0].startswith(f"error: quality gate failed: perplexity ratio {ratio:.4f} ")
    assert f"above --max-ratio {limit:g} by {ratio - limit:.4f} ({ratio / limit - 1:.1%})" in errors[0]
    assert "perplexity ratio" in out  # the results are still shown ...
    assert yaml.safe_load(path.read_text())["gate"]["passed"] is False  # ... and written


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-ratio", "1.5"], "--max-ratio compares perplexities: it needs --baseline MODEL and --data FILE"),
    (["--max-ratio", "0", "--baseline", "x"], "--max-ratio must be a positive number, got 0.0"),
])
def test_gate_needs_a_baseline_and_a_positive_ratio(capsys, compressed_run, extra, message):
    code, out, err = run(capsys, "eval", compressed_run.out, "--data", compressed_run.calib, *extra)
    assert (code, out, err) == (2, "", f"error: {message}\n")


def test_output_file_replaces_only_earlier_results(tmp_path, compressed_run, capsys):
    """-o never overwrites a file lrc did not write (here: the model's own config.json, and a user's notes)."""
    from ..conftest import file_hashes, run_main

    notes = tmp_path / "notes.yaml"
    notes.write_text("my: notes\n")
    for target in (notes, compressed_run.out / "config.json"):
        root = target.parent
        before = file_hashes(root)
        code, _, stderr = run_main(capsys, "eval", compressed_run.out, "--data", compressed_run.calib, "--seq-len", 16,
                                   "--windows", 1, "-o", target)
        assert code == 2 and "is not an earlier `lrc eval -o` file" in stderr, stderr
        assert file_hashes(root) == before


def test_an_unwritable_output_file_fails_before_evaluating(tmp_path, compressed_run, capsys, monkeypatch):
    """-o into a missing folder fails at once; a disk refusing the write at the end exits 2 with its reason."""
    from ..conftest import run_main

    args = ["eval", compressed_run.out, "--data", compressed_run.calib, "--seq-len", 16, "--windows", 1]
    missing = tmp_path / "missing" / "e.yaml"
    code, stdout, stderr = run_main(capsys, *args, "-o", missing)
    assert (code, stdout) == (2, "") and stderr == f"error: cannot write {missing}: folder {missing.parent} does not exist\n"

    def refuse(path, text):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr("lrc.cli.eval.write_atomically", refuse)
    code, _, stderr = run_main(capsys, *args, "-o", tmp_path / "e.yaml", "--quiet")
    assert code == 2 and stderr.strip().splitlines()[-1] == f"error: Read-only file system: {tmp_path / 'e.yaml'}"


def test_a_baseline_with_another_tokenizer_is_refused_before_evaluating(tmp_path, compressed_run, capsys):
    """Per-token perplexities of two tokenizations are not comparable: the ratio (and the gate) would be
    meaningless. The same model with a lower-casing tokenizer splits the text differently: refused, one line."""
    import shutil

    from tokenizers import normalizers

    from ..conftest import byte_tokenizer, run_main

    other = tmp_path / "lowercased"
    shutil.copytree(compressed_run.model, other)
    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.save_pretrained(other)
    code, stdout, stderr = run_main(capsys, "eval", compressed_run.out, "--data", compressed_run.calib, "--seq-len", 16,
                                    "--windows", 1, "--baseline", other, "--max-ratio", 100)
    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"error: {compressed_run.out} and the baseline {other} tokenize {compressed_run.calib} "
                             "differently") and stderr.count("\n") == 1
    code, _, stderr = run_main(capsys, "eval", compressed_run.out, "--data", compressed_run.calib, "--batch-size", 0)
    assert (code, stderr) == (2, "error: --batch-size must be at least 1, got 0\n")


@pytest.mark.parametrize("encoder_is", ["baseline", "model"])
def test_a_decoder_and_an_encoder_are_not_compared(tmp_path, calib_file, capsys, encoder_is):
    """A perplexity and a cosine similarity have no ratio: a decoder against an encoder baseline (or the reverse)
    is refused in one line, not an unexpected KeyError."""
    from ..conftest import run_main, save_tiny_model

    decoder, encoder = save_tiny_model(tmp_path / "llama", "llama"), save_tiny_model(tmp_path / "bert", "bert")
    model, baseline = (decoder, encoder) if encoder_is == "baseline" else (encoder, decoder)
    code, stdout, stderr = run_main(capsys, "eval", model, "--data", calib_file, "--seq-len", 16, "--windows", 1,
                                    "--baseline", baseline)
    assert (code, stdout) == (2, "")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]  # after the progress lines
    assert len(errors) == 1 and errors[0].endswith("compare a model with the dense model it was compressed from")


def test_more_windows_than_the_text_holds_is_said(capsys, compressed_run, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(compressed_run.calib.read_text()[:2000])
    with pytest.warns(UserWarning, match=r"--windows 100: the text holds 31 windows of 64 tokens, all of which"):
        code, _, stderr = run(capsys, "eval", compressed_run.out, "--data", text, "--seq-len", 64, "--windows", 100)
    assert code == 0, stderr
