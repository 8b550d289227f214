"""CompressionConfig: YAML round trip, validation, and the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrc.allocate import ALLOCATORS
from lrc.config import CompressionConfig
from lrc.errors import ConfigError
from lrc.factorize import METHODS

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_yaml_round_trip(tmp_path):
    config = CompressionConfig(budget=0.25, method="svd-llm-v2", method_options={"floor": 1e-7}, samples=8,
                               keep_dense=["q_proj"], calib="x.txt")
    path = tmp_path / "r.yaml"
    path.write_text(config.to_yaml())
    assert CompressionConfig.from_yaml(path) == config


def test_unknown_key_names_it_and_suggests(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("budjet: 0.3\n")
    with pytest.raises(ConfigError, match=r"unknown recipe key 'budjet' \(did you mean 'budget'\?\)"):
        CompressionConfig.from_yaml(path)


def test_not_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("budget: [0.3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        CompressionConfig.from_yaml(path)


def test_a_key_given_twice_is_refused(tmp_path):
    """YAML itself would keep the last value silently; a recipe says which key and where, at any depth."""
    path = tmp_path / "r.yaml"
    path.write_text("budget: 0.2\nmethod: loss-aware\nbudget: 0.4\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 3\): key 'budget' is given twice"):
        CompressionConfig.from_yaml(path)
    path.write_text("method_options:\n  damping: 0.01\n  damping: 0.1\n")
    with pytest.raises(ConfigError, match=r"\(line 3\): key 'damping' is given twice"):
        CompressionConfig.from_yaml(path)


@pytest.mark.parametrize("budget", [0, 1, -0.1, 1.5, float("nan"), "abc", True])
def test_budget_out_of_range(budget):
    with pytest.raises(ConfigError, match="budget"):
        CompressionConfig(budget=budget)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    config = CompressionConfig.from_yaml(recipe)
    METHODS.create(config.method, config.method_options)
    ALLOCATORS.create(config.allocator, config.allocator_options)


def test_recipes_exist():
    assert len(list(RECIPES.glob("*.yaml"))) >= 1


def test_unknown_method_option():
    with pytest.raises(ConfigError, match=r"unknown option 'dampin' for method 'svd-llm' \(did you mean 'damping'\?\)"):
        METHODS.create("svd-llm", {"dampin": 1e-3})


def test_options_a_class_keeps_for_itself_are_not_offered():
    """The knapsack's price and outside are set by lrc from --objective, not options a recipe may give."""
    for key in ("price", "outside"):
        with pytest.raises(ConfigError, match=rf"unknown option '{key}' for allocator 'knapsack' \(valid: rank_step, "
                                              "max_units, same_rank_per_type\\)"):
            ALLOCATORS.create("knapsack", {key: 1})
    with pytest.raises(ConfigError, match=r"unknown option 'last_unit' .*\(did you mean 'max_units'\?\)"):
        ALLOCATORS.create("knapsack", {"last_unit": 1})


@pytest.mark.parametrize("method", ["svd-llm", "loss-aware"])
def test_damping_is_checked_when_the_recipe_is_read(method):
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="damping must be a number >= 0"):
            METHODS.create(method, {"damping": bad})
    assert METHODS.create(method, {"damping": 0.5}).damping == 0.5


@pytest.mark.parametrize(("fields", "message"), [
    ({"seed": 2**70}, "seed must fit in 64 bits"),
    ({"seed": -(2**63) - 1}, "seed must fit in 64 bits"),
    ({"keep_dense": ["mlp.("]}, "bad regex in keep_dense: 'mlp.\\('"),
    ({"exclude": ["[lm_head"]}, "bad regex in exclude"),
])
def test_seed_range_and_regexes_checked_on_construction(fields, message):
    with pytest.raises(ConfigError, match=message):
        CompressionConfig(**fields)
