"""`CompressionConfig`: every setting of a compression run, one object that round-trips through YAML.

A recipe file is just this object written as YAML; the CLI flags override its fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .value_types import check_fields

DEFAULT_EXCLUDE = (r"(^|\.)lm_head$",)  # the output head, never factorized by default


@dataclass
class CompressionConfig:
    """What to compress, how, and with which calibration data.

    budget: fraction of the targeted linear layers' parameters to remove (SVD-LLM's compression ratio), in (0, 1).
    method / method_options: factorization method from `lrc.factorize.METHODS` and its keyword options.
    allocator / allocator_options: rank allocator from `lrc.allocate.ALLOCATORS` and its keyword options.
    calib: calibration text (a .txt or .jsonl path, or `hf://datasets/OWNER/NAME/FILE`); None samples text
        from the model itself (data-free).
    samples, seq_len: number and length (tokens) of calibration windows.
    grad_samples: windows used for the backward pass of gradient-weighted methods (None: all of them).
    batch_size: windows per forward pass during calibration.
    sequential: refit each layer on the outputs of the already compressed layers before it (see lrc.sequential).
    seed: seeds window choice and any sampling; same inputs and seed give the same output.
    device: where the calibration and linear algebra run (`cpu`, `cuda`, `cuda:1`).
    dtype: dtype of the written weights (`float32`, `bfloat16`, `float16`); None keeps the model's dtype.
    keep_dense: regexes (re.search on module names) of linear layers never to factorize.
    min_kept: every factorized matrix keeps at least this fraction of its parameters (0 = no floor).
    exclude: regexes of linear layers not to target at all (the default skips `lm_head`).
    heldout_windows: calibration-text windows kept out of the statistics, on which the compressed model's
        loss is compared with the dense model's (see lrc.quality_check); 0 skips the check.
    objective: what the budget counts (see lrc.allocate.objective): `disk` (stored bytes), `memory` (bytes
        held in memory when running) or `latency` (the whole forward pass's time, measured on the device;
        not with `stream`); knapsack only.
    latency_tokens: tokens per forward pass the `latency` objective times (512: prefill; 1: decoding).
    heldout_max_ratio: the run fails when the compressed model's held-out perplexity exceeds this many
        times the dense model's.
    stream: load, calibrate, decompose and write one decoder block at a time, never holding the whole model
        or all its statistics (see lrc.stream); the same output bytes as without it.
    stream_activation_gib: in streaming mode, GiB of hidden states between blocks kept in memory; beyond it
        they are spilled to files under the cache folder.
    """

    budget: float = 0.3
    method: str = "sparse-dictionary"
    method_options: dict[str, Any] = field(default_factory=dict)
    allocator: str = "knapsack"
    allocator_options: dict[str, Any] = field(default_factory=dict)
    calib: str | None = None
    samples: int = 128
    seq_len: int = 512
    grad_samples: int | None = None
    batch_size: int = 8
    sequential: bool = False
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    keep_dense: list[str] = field(default_factory=list)
    min_kept: float = 0.0
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    heldout_windows: int = 4
    heldout_max_ratio: float = 100.0
    objective: str = "disk"
    latency_tokens: int = 512
    stream: bool = False
    stream_activation_gib: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError on a value of the wrong type (naming its key), out of range, or a regex that does not
        compile; called on construction and after overrides. The method's and allocator's names and options and
        the device are checked when compress starts (against the registries and the machine)."""
        check_fields(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if not (math.isfinite(self.budget) and 0.0 < self.budget < 1.0):
            raise ConfigError(f"budget must be in (0, 1) (fraction of parameters removed), got {self.budget}")
        for name in ("samples", "seq_len", "batch_size", "latency_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.grad_samples is not None and self.grad_samples < 1:
            raise ConfigError(f"grad_samples must be a positive integer or null, got {self.grad_samples!r}")
        if self.heldout_windows < 0:
            raise ConfigError(f"heldout_windows must be 0 (no held-out check) or more, got {self.heldout_windows}")
        if not (math.isfinite(self.heldout_max_ratio) and self.heldout_max_ratio > 1.0):
            raise ConfigError(f"heldout_max_ratio must be a number above 1, got {self.heldout_max_ratio}")
        if not 0 <= self.min_kept < 1:
            raise ConfigError(f"min_kept must be a fraction in [0, 1), got {self.min_kept!r}")
        # the objectives live with the allocator
        from .allocate.objective import LATENCY_NEEDS_MODEL, check_objective

        check_objective(self.objective)
        if self.objective != "disk" and self.allocator != "knapsack":
            raise ConfigError(f"objective {self.objective!r} prices the knapsack's options; allocator {self.allocator!r} counts parameters")
        if self.objective == "latency" and self.stream:
            raise ConfigError(LATENCY_NEEDS_MODEL)
        if not (math.isfinite(self.stream_activation_gib) and self.stream_activation_gib >= 0):
            raise ConfigError(f"stream_activation_gib must be 0 or more (GiB), got {self.stream_activation_gib!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not -(2**63) <= self.seed < 2**64:  # what torch's generators take
            raise ConfigError(f"seed must fit in 64 bits (-2**63 to 2**64 - 1), got {self.seed}")
        for name in ("keep_dense", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"bad regex in {name}: {pattern!r}: {exc}") from None

    # --- dict / YAML round trip -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a recipe must be a YAML mapping of settings, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                raise ConfigError(f"unknown recipe key {key!r}{suggest(str(key), known)}")
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> CompressionConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"recipe not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read recipe {path}: {exc}") from None
        try:
            data = yaml.load(text, Loader=RecipeLoader)  # RecipeLoader is a SafeLoader
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            problem = f": {exc.problem}" if isinstance(exc, DuplicateKeyError) else ""
            raise ConfigError(f"recipe {path} is not valid YAML{line}{problem}") from None
        return cls.from_dict(data or {})

    def replace(self, **overrides: Any) -> CompressionConfig:
        """A copy with the given fields changed; None values are ignored (flag not given)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names one key twice (PyYAML would keep the last silently)."""


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: a recipe's `budget: 0.2` followed later by
    `budget: 0.4` is a mistake to report, not a choice to guess."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def suggest(word: str, choices: list[str]) -> str:
    """' (did you mean X?)' for the closest of `choices`, or the list of valid choices."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(choices)})"
