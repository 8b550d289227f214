"""Recipe value types through the CLI: a value of the wrong YAML type is one `error:` line naming its key
(and, for method / allocator options, the method or allocator); nothing is written."""

from __future__ import annotations

import pytest

from ..conftest import file_hashes, run_main

CASES = [
    ('sequential: "no"', "sequential must be a boolean (true or false), got 'no' (a string)"),
    ("sequential: 1", "sequential must be a boolean (true or false), got 1 (an integer)"),
    ('samples: "4"', "samples must be an integer, got '4' (a string) (remove the quotes)"),
    ("samples: 4.0", "samples must be an integer, got 4.0 (a number)"),
    ("seed: true", "seed must be an integer, got True (a boolean)"),
    ("grad_samples: 2.5", "grad_samples must be an integer or null, got 2.5 (a number)"),
    ('budget: "0.3"', "budget must be a number, got '0.3' (a string) (remove the quotes)"),
    ("min_kept: 1e-2", "min_kept must be a number, got '1e-2' (a string) (YAML reads 1e-2 as a string: write 0.01)"),
    ("heldout_windows: yes", "heldout_windows must be an integer, got True (a boolean)"),
    ("heldout_max_ratio: [2]", "heldout_max_ratio must be a number, got [2] (a list)"),
    ("method: 3", "method must be a string, got 3 (an integer)"),
    ("calib: 5", "calib must be a string or null, got 5 (an integer)"),
    ("dtype: 16", "dtype must be a string or null, got 16 (an integer)"),
    ("keep_dense: q_proj", "keep_dense must be a list of strings, got 'q_proj' (a string)"),
    ("exclude: [lm_head, 3]", "exclude must be a list of strings, got ['lm_head', 3] (a list)"),
    ("method_options: [damping]", "method_options must be a mapping of names to values, got ['damping'] (a list)"),
    ("allocator_options: {1: 2}", "allocator_options must be a mapping of names to values, got {1: 2} (a mapping)"),
    ("method: svd-llm\nmethod_options: {damping: 1e-3}",
     "damping (option of method 'svd-llm') must be a number, got '1e-3' (a string) (YAML reads 1e-3 as a string: "
     "write 0.001)"),
    ("method_options: {ratios: 0.5}",
     "ratios (option of method 'sparse-dictionary') must be a list of numbers, got 0.5 (a number)"),
    ("method_options: {reselect: 2.0}",
     "reselect (option of method 'sparse-dictionary') must be an integer, got 2.0 (a number)"),
    ("allocator_options: {same_rank_per_type: 'yes'}",
     "same_rank_per_type (option of allocator 'knapsack') must be a boolean (true or false), got 'yes' (a string)"),
    ("method_options: {pattern: 2:4}",
     "pattern (option of method 'sparse-dictionary') must be a string or null, got 124 (an integer) (YAML reads an "
     "unquoted N:M as a base-60 number, 2:4 as 124: quote it)"),
    ("allocator: energy\nallocator_options: {mode: 1}", "mode (option of allocator 'energy') must be a string, got 1 (an integer)"),
]


def recipe_args(model, calib, out, recipe):
    """`lrc compress` with every method and allocator setting left to the recipe."""
    return ["compress", model, "-o", out, "--calib", calib, "--samples", 4, "--seq-len", 32, "--recipe", recipe]


@pytest.mark.parametrize(("recipe", "message"), CASES, ids=[r.split(":")[0] + str(i) for i, (r, _) in enumerate(CASES)])
def test_wrong_value_type_names_the_key(capsys, tmp_path, llama_dir, calib_file, recipe, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe + "\n")
    before = file_hashes(tmp_path)
    code, _, stderr = run_main(capsys, *recipe_args(llama_dir, calib_file, tmp_path / "out", path))
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [f"error: {message}"]
    assert file_hashes(tmp_path) == before


def test_right_types_pass(capsys, tmp_path, llama_dir, calib_file):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: loss-aware\nsequential: false\nbudget: 0.4\nmin_kept: 0\nseed: 2\nkeep_dense: []\n"
                    "method_options: {damping: 1.0e-5}\nallocator_options: {rank_step: 4}\nheldout_max_ratio: 50\n")
    code, _, stderr = run_main(capsys, *recipe_args(llama_dir, calib_file, tmp_path / "out", path))
    assert code == 0, stderr
