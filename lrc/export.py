"""`export_dense`: an lrc output as the dense checkpoint it computes, for tools that take only dense weights.

Every compressed layer becomes the module it replaced (nn.Linear, or GPT-2's Conv1D storing Wᵀ) holding its
`dense_weight()` (out x in, the product of its factors) and its bias, under the original tensor names;
experts lrc stores unfused are written one matrix each, which transformers' own conversions merge back
when it loads. config.json loses `quantization_config` and `auto_map`; the tokenizer and generation config
are copied, and `lrc_export.yaml` says which lrc output it came from and lists the files written (so
`--overwrite` may replace them later, and nothing else).
The folder is written like `lrc compress`'s output: refused where it could lose a file, built in a
temporary sibling, checked, then moved into place. Plain transformers loads it, no lrc needed.
The file is as large as the original model's (at the output's dtype).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import __version__
from .errors import LrcError
from .forms import LAYER_FORMS
from .io.checkpoint import check_finite_files, read_tensor_names, write_checkpoint
from .io.output import FILES_KEY, atomic_directory, check_output_path, protected_places, written_files
from .io.report import EXPORT_MARKER
from .progress import Progress, no_progress


def dense_module(layer: Any, original: nn.Module) -> nn.Module:
    """A module of `original`'s class (nn.Linear or Conv1D) computing what the compressed `layer` does:
    weight W = layer.dense_weight() (Conv1D stores Wᵀ), bias b = layer(0) when the original had one."""
    from transformers.pytorch_utils import Conv1D

    weight = layer.dense_weight().detach()
    out_features, in_features = weight.shape
    has_bias = getattr(original, "bias", None) is not None
    bias = layer(torch.zeros(1, in_features, dtype=weight.dtype, device=weight.device))[0].detach() if has_bias else None
    if isinstance(original, Conv1D):
        with torch.device("meta"):
            dense: nn.Module = Conv1D(out_features, in_features)
        dense.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
    elif isinstance(original, nn.Linear):
        dense = nn.Linear(in_features, out_features, bias=has_bias, device="meta", dtype=weight.dtype)
        dense.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    else:
        raise LrcError(f"cannot export a dense {type(original).__name__}: lrc compresses nn.Linear and Conv1D only")
    if bias is not None:
        dense.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return dense


def densify(model: nn.Module) -> list[str]:
    """Replace every compressed layer of `model` by its dense module, in place; return their names."""
    from .model.adapters import adapter_for
    from .model.targets import replace_module

    model_class: Any = type(model)
    forms = tuple(LAYER_FORMS.get(kind) for kind in LAYER_FORMS.names())
    names = [name for name, module in model.named_modules() if isinstance(module, forms)]
    with torch.device("meta"):  # the original modules, to know each one's class and bias
        original = model_class._from_config(model.config)
    adapter_for(original).prepare(original)
    for name in names:
        replace_module(model, name, dense_module(model.get_submodule(name), original.get_submodule(name)))
    return names


def export_dense(model: str, output: str | Path, *, overwrite: bool = False, progress: Progress = no_progress) -> Path:
    """Write the dense equivalent of the lrc output `model` (a folder, Hub id or alias) into `output`."""
    from .sources import load_model, resolve_model

    out = Path(output)
    source = resolve_model(model)
    places = protected_places([] if source.kind == "hub" else [source.path])
    claim = check_output_path(out, overwrite, places)  # a lock on the output, held until it is written
    loaded = load_model(model, progress=progress)
    names = densify(loaded.model)
    if not names:
        raise LrcError(f"{model} has no compressed layer: it is already dense, nothing to export")
    config = loaded.model.config
    for key in ("quantization_config", "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    check_output_path(out, overwrite, places | protected_places([Path(loaded.folder)]))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_checkpoint(loaded.model, tmp, loaded.tokenizer)
        written = read_tensor_names(tmp)
        for name in names:
            if f"{name}.weight" not in written:
                raise LrcError(f"the exported checkpoint is missing {name}.weight")
        check_finite_files(tmp)
        marker = {"lrc_version": __version__, "exported_from": source.describe()["path"] if source.kind != "hub" else str(model), "densified_layers": len(names),
                  FILES_KEY: written_files(tmp, EXPORT_MARKER)}  # what --overwrite may replace later
        (tmp / EXPORT_MARKER).write_text(yaml.safe_dump(marker, sort_keys=False), encoding="utf-8")
    del claim
    return out
