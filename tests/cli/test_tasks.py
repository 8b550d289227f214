"""`lrc eval --tasks` through lm-evaluation-harness, end to end on a multiple-choice task written here.

The task is a YAML config over a local JSON file (no network); the accuracy lm-eval reports is checked
against the model's own log-likelihoods of every choice, computed here.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import lrc
from lrc.cli import main

QUESTIONS = [("The sky on a clear day is", ["blue", "green", "loud"], 0),
             ("Two plus two equals", ["five", "four", "seven"], 1),
             ("Ice is made of frozen", ["sand", "fire", "water"], 2),
             ("A cat says", ["meow", "moo", "quack"], 0),
             ("The opposite of hot is", ["tall", "cold", "late"], 1),
             ("Paris is the capital of", ["Spain", "Peru", "France"], 2),
             ("Bees make", ["honey", "glass", "steel"], 0),
             ("A week has seven", ["hours", "days", "years"], 1),
             ("The sun rises in the", ["north", "west", "east"], 2),
             ("Fish live in", ["water", "trees", "clouds"], 0)]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS))
    (folder / "tiny_mc.yaml").write_text(f"""task: lrc_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {folder / "hf-cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return folder


def loglikelihoods(model_dir, context: str, choices: list[str]) -> list[float]:
    """log p(" " + choice | context) under the model, summed over the choice's tokens."""
    loaded = lrc.load(str(model_dir))
    tok = loaded.tokenizer
    scores = []
    for choice in choices:
        context_ids = tok(context, add_special_tokens=False).input_ids
        ids = tok(context + " " + choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        scores.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(context_ids), len(ids))))
    return scores


def expected_accuracy(model_dir, limit: int) -> tuple[float, float]:
    """(acc, acc_norm) as lm-eval defines them: argmax of the log-likelihood, or of it per character."""
    hits = norm_hits = 0
    for question, choices, answer in QUESTIONS[:limit]:
        scores = loglikelihoods(model_dir, question, choices)
        hits += max(range(len(choices)), key=lambda i: scores[i]) == answer
        norm_hits += max(range(len(choices)), key=lambda i: scores[i] / len(choices[i])) == answer
    return hits / limit, norm_hits / limit


def test_local_task_end_to_end(capsys, compressed_run, task_folder):
    capsys.readouterr()
    code = main(["eval", str(compressed_run.out), "--baseline", str(compressed_run.model), "--tasks", "lrc_tiny_mc",
                 "--tasks-path", str(task_folder), "--task-limit", "8", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["data"] is None and data["perplexity_ratio"] is None and data["gate"] is None
    for row, folder in zip(data["results"], (compressed_run.out, compressed_run.model)):
        scores = row["tasks"]["lrc_tiny_mc"]
        assert scores["samples"] == 8
        acc, acc_norm = expected_accuracy(folder, 8)
        assert (scores["acc"], scores["acc_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm))
        assert scores["acc_stderr"] == pytest.approx((acc * (1 - acc) / 7) ** 0.5)
    assert "lrc_tiny_mc" in captured.err  # the table, on stderr
    assert "WARNING" not in captured.err and "Generating test split" not in captured.err  # lm-eval, datasets kept quiet


def test_unknown_task_is_one_line(capsys, compressed_run, task_folder):
    capsys.readouterr()
    code = main(["eval", str(compressed_run.out), "--tasks", "lrc_tiny_mcq", "--tasks-path", str(task_folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unknown lm-eval task(s): lrc_tiny_mcq (") and err.count("\n") == 1


def test_without_lm_eval_says_what_to_install(capsys, compressed_run, monkeypatch):
    for name in ("lm_eval", "lm_eval.tasks"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    capsys.readouterr()
    code = main(["eval", str(compressed_run.out), "--tasks", "piqa"])
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    assert captured.err.startswith("error: --tasks needs lm-evaluation-harness, which is not installed (lm_eval")
    assert captured.err.endswith("missing): pip install 'lrc[tasks]'\n") and captured.err.count("\n") == 1


def test_every_metric_a_task_defines_is_reported(capsys, compressed_run, tmp_path):
    """A perplexity task's byte_perplexity / bits_per_byte are reported like acc (bits = log2 of the byte
    perplexity, as lm-eval defines both from one log-likelihood); a task whose data file is missing is one line."""
    import math

    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": q + " " + c[a]}) for q, c, a in QUESTIONS[:4]))
    task = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
    (tmp_path / "ppl.yaml").write_text(task.format(name="lrc_tiny_ppl", data=data, cache=tmp_path / "hf-cache"))
    (tmp_path / "gone.yaml").write_text(task.format(name="lrc_tiny_gone", data=tmp_path / "missing.jsonl",
                                                    cache=tmp_path / "hf-cache"))
    capsys.readouterr()
    code = main(["eval", str(compressed_run.out), "--tasks", "lrc_tiny_ppl", "--tasks-path", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    scores = json.loads(captured.out)["results"][0]["tasks"]["lrc_tiny_ppl"]
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(scores) and scores["samples"] == 4
    assert scores["bits_per_byte"] == pytest.approx(math.log2(scores["byte_perplexity"]))
    code = main(["eval", str(compressed_run.out), "--tasks", "lrc_tiny_gone", "--tasks-path", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: lm-eval could not read the data of lrc_tiny_gone") and err.count("\n") == 1
