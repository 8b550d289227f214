"""Converting a .gguf file into a safetensors checkpoint folder one tensor at a time, never holding the model.

The values are transformers' own, by the steps of `load_gguf_checkpoint` (transformers/modeling_gguf_pytorch_utils.py):
each tensor of the file is dequantized by gguf-py (`gguf.dequantize`, float32), passed through the
architecture's `TENSOR_PROCESSORS[arch](config).process` (e.g. llama's q/k row permutation undone), renamed
by `get_gguf_hf_weights_map` of the model skeleton, and cast to the dtype `from_pretrained(..., gguf_file=...)`
loads (the config's dtype, else float32). It then goes straight to its offset in the safetensors shards
(`ShardedCheckpointWriter`); config.json, generation_config.json and the tokenizer files are written as
`write_checkpoint` writes them. The folder holds the bytes of the whole-model conversion (`write_checkpoint` of the model
`from_pretrained` loads), tied weights included (an lm_head sharing the embedding is not stored).

Peak memory: one tensor's quantized bytes, read by a positioned read (not through the file mapping, whose
touched pages would stay resident), its float32 values and the processed copy, plus the model skeleton on the meta device,
the tokenizer and the parsed metadata; not the model.

Whole-model path (`from_pretrained` then `write_checkpoint`, the model in memory) kept for what cannot be done
tensor by tensor, see `whole_model_reason`: architectures transformers reads through its newer GGUF
loader (`GGUF_ARCHS`: qwen35, qwen35moe, lfm2, with their own conversion ops); processors that merge or split tensors across the
file through the whole parameter dict (mixture-of-experts: qwen2moe, qwen3moe, gpt-oss, minimax-m2, and any
processor not listed in PER_TENSOR_PROCESSORS); models whose checkpoint conversion mapping would rename or
convert a tensor on load; a load dtype with float32-kept modules; a file tensor that lands on a tied weight.

Before the folder is used every tensor the skeleton stores (its state_dict, tied weights once) has been
written exactly once with the skeleton's shape, or the conversion stops with a one-line ModelLoadError.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LrcError, ModelLoadError
from ..load_check import name_some, one_line
from ..progress import Progress, no_progress

PHASE = "convert GGUF to safetensors (once)"
CHUNK_BYTES = 1 << 20  # quantized bytes dequantized at a time (see dequantize_rows): a few MiB of float32 values
# transformers' tensor processors whose `process` uses one tensor alone (GPT-2's stores lm_head itself, in the
# parameter dict handed to it: collected per call)
PER_TENSOR_PROCESSORS = {
    "TensorProcessor", "LlamaTensorProcessor", "BloomTensorProcessor", "T5TensorProcessor", "GPT2TensorProcessor",
    "MambaTensorProcessor", "NemotronTensorProcessor", "Gemma2TensorProcessor", "Lfm2TensorProcessor",
}


@dataclass
class StreamPlan:
    """What the tensor-by-tensor conversion needs. skeleton: the model on the meta device; processor:
    transformers' tensor processor; tensors: gguf-py's tensor table of the file; key_map: GGUF tensor name ->
    model name; layout: {model name: (dtype, shape)} in checkpoint order (tied weights once)."""

    skeleton: Any
    processor: Any
    tensors: list[Any]
    key_map: dict[str, str]
    layout: dict[str, tuple[torch.dtype, list[int]]]


GGUF_CONVERSION = 2  # part of a converted folder's cache key: raise it when a conversion writes other files
# (2: the saved tokenizer checked against the GGUF's)


def convert_gguf(path: Path, folder: Path, progress: Progress = no_progress) -> None:
    """Write the safetensors checkpoint of the GGUF file `path` into the (empty) folder `folder`."""
    from transformers import AutoTokenizer

    from .checkpoint import write_model_files

    with reading(path):
        plan = stream_plan(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    if plan is None:
        write_whole_model(path, folder, tokenizer, progress)
        check_saved_tokenizer(tokenizer, folder, path)
        return
    write_model_files(plan.skeleton, folder, tokenizer, None, None, None)  # first, to free the tokenizer
    check_saved_tokenizer(tokenizer, folder, path)
    del tokenizer
    write_tensors(path, folder, plan, progress)


# spaces, digits, punctuation, accents, CJK, an emoji, a tab and a new line: where tokenizers differ
TOKENIZER_PROBE = " The tower is 324 metres (1,063 ft) tall.\nÉté à Genève: 中文, 😀\tend"


def check_saved_tokenizer(tokenizer: Any, folder: Path, path: Path) -> None:
    """The tokenizer saved in `folder` tokenizes as the GGUF's did. transformers' tokenizer class of some
    architectures replaces the saved tokenizer.json's pre-tokenizer on reload (a gemma GGUF with a byte-level
    vocabulary came back splitting every space into an unknown token): then the folder names the generic
    fast tokenizer, which reads tokenizer.json as written, and failing that the file is refused."""
    expected = tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids
    if saved_tokenizer_gives(folder, expected):
        return
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if saved_tokenizer_gives(folder, expected):
            return
    raise ModelLoadError(f"transformers does not save the tokenizer of {path} faithfully (it tokenizes text "
                         "differently once saved and loaded again): lrc cannot use this GGUF file; give the model "
                         "as a safetensors folder")


def saved_tokenizer_gives(folder: Path, expected: list[int]) -> bool:
    """Whether the tokenizer saved in `folder` loads and tokenizes TOKENIZER_PROBE as `expected`."""
    from transformers import AutoTokenizer

    try:
        saved = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        return bool(saved(TOKENIZER_PROBE, add_special_tokens=False).input_ids == expected)
    except Exception:  # noqa: BLE001  (a saved tokenizer that cannot load or tokenize is not the GGUF's)
        return False


def whole_model_reason(architecture: str) -> str | None:
    """Why a GGUF of `architecture` (its general.architecture) needs the whole-model path, from the architecture
    alone; None when transformers reads it tensor by tensor (`load_gguf_checkpoint` with a per-tensor processor)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    try:
        from transformers.integrations.gguf import GGUF_ARCHS
    except ImportError:  # transformers before 5.17 has no newer GGUF loader
        GGUF_ARCHS = {}
    if architecture in GGUF_ARCHS:
        return f"transformers converts {architecture} GGUF files with its own load operations"
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor).__name__
    if processor not in PER_TENSOR_PROCESSORS:
        return f"{processor} builds tensors from several tensors of the file"
    return None


def stream_plan(path: Path) -> StreamPlan | None:
    """The plan for converting `path` tensor by tensor, or None where the whole-model path is needed."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from ..stream.shard_writer import unique_entries

    # each parse of the metadata holds the whole vocabulary in Python objects: one at a time, kept no longer than needed
    reader = gguf.GGUFReader(path)
    architecture = str(reader.fields["general.architecture"].contents())
    tensors = list(reader.tensors)
    del reader
    if whole_model_reason(architecture):
        return None
    processor_config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    dtype = load_dtype(config)
    config.dtype = dtype  # as from_pretrained sets it (config.json records it)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=processor_config)
    key_map = get_gguf_hf_weights_map(skeleton, processor)
    entries = unique_entries(skeleton)
    layout = {n: (dtype if t.is_floating_point() else t.dtype, list(t.shape)) for n, t in entries.items()}
    targets = {key_map[t.name] for t in tensors if t.name in key_map}
    if targets - set(layout) or converted_on_load(skeleton, targets) or skeleton._get_dtype_plan(dtype):
        return None
    return StreamPlan(skeleton, processor, tensors, key_map, layout)


def load_dtype(config: Any) -> torch.dtype:
    """The dtype `from_pretrained(dir, gguf_file=...)` loads a legacy-path GGUF in: the config's, else the default."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()


def converted_on_load(skeleton: Any, names: set[str]) -> bool:
    """Whether transformers' checkpoint conversion mapping for the model would rename or convert one of `names`
    on load (then the loaded model is not the file's tensors under these names)."""
    from .checkpoint import renaming_on_load

    rename = renaming_on_load(skeleton)
    return any(rename(n) != (n, None) for n in sorted(names))


def write_tensors(path: Path, folder: Path, plan: StreamPlan, progress: Progress) -> None:
    """Dequantize, process, rename and cast each tensor of the file and write it to its shard; then check that every
    tensor of the layout was written once with its shape (ModelLoadError naming the first ones otherwise)."""
    from ..stream.shard_writer import ShardedCheckpointWriter

    tensors = plan.tensors
    writer = ShardedCheckpointWriter(folder, plan.layout)
    written: set[str] = set()
    try:
        with path.open("rb") as handle:
            for done, tensor in enumerate(tensors):
                progress(PHASE, done, len(tensors))
                write_tensor(path, handle, tensor, plan, writer, written)
    finally:
        with contextlib.suppress(LrcError):  # closes the files; raises when a tensor is missing (reported below)
            writer.close()
    missing = [n for n in plan.layout if n not in written]
    if missing:
        raise ModelLoadError(f"GGUF file {path} lacks {len(missing)} tensor(s) the {type(plan.skeleton).__name__} "
                             f"architecture needs: {name_some(missing)}; refusing to fill weights with random values")
    progress(PHASE, len(tensors), len(tensors))


def write_tensor(path: Path, handle: Any, tensor: Any, plan: StreamPlan, writer: Any, written: set[str]) -> None:
    """Convert one GGUF tensor (`handle`: the open file) and write what it becomes; its values die on return."""
    from .checkpoint import written_tensor

    with reading(path):
        converted = model_tensors(tensor, read_raw(handle, tensor), plan)
    while converted:
        name, value = converted.popitem()
        check_placement(path, tensor.name, name, value, plan.layout, written)
        writer.write(name, written_tensor(name, value.to(plan.layout[name][0]), None))
        written.add(name)
        del value


def read_raw(handle: Any, tensor: Any) -> Any:
    """The file bytes of one GGUFReader tensor, as the array `tensor.data` would give (same dtype and shape), read
    by one positioned read."""
    import numpy as np

    raw = np.empty(tensor.data.shape, dtype=tensor.data.dtype)
    handle.seek(int(tensor.data_offset))
    if handle.readinto(raw.reshape(-1).view(np.uint8)) != raw.nbytes:
        raise ModelLoadError(f"GGUF tensor {tensor.name} ends past the end of the file (truncated file?)")
    return raw


def model_tensors(tensor: Any, raw: Any, plan: StreamPlan) -> dict[str, torch.Tensor]:
    """{model name: values} that one GGUF tensor becomes, by `load_gguf_checkpoint`'s loop: dequantize, process,
    map the name (a tensor the model has no name for is skipped there, and here)."""
    import numpy as np

    weights = dequantize_rows(raw, tensor.tensor_type)
    stored: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}  # where a processor puts tensors itself
    result = plan.processor.process(
        weights=weights, name=tensor.name, tensor_key_mapping=plan.key_map, parsed_parameters=stored
    )
    del weights, raw
    out = dict(stored["tensors"])
    if result.name in plan.key_map:  # transformers copies (np.copy); a contiguous array is copied only when a view
        out[plan.key_map[result.name]] = torch.from_numpy(np.ascontiguousarray(result.weights))
    return out


def dequantize_rows(raw: Any, kind: Any) -> Any:
    """`gguf.dequantize(raw, kind)`, computed about CHUNK_BYTES of `raw` at a time into one float32 array for quantized
    types: the same values (each block of a row is dequantized on its own, elementwise), without the full-size
    temporaries gguf-py's arithmetic makes."""
    import gguf
    import numpy as np

    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    if kind in plain or raw.ndim < 2 or raw.shape[0] < 2:
        return gguf.dequantize(raw, kind)
    rows = raw.reshape(-1, raw.shape[-1])
    step = max(1, CHUNK_BYTES // max(1, rows.shape[1]))
    first = gguf.dequantize(rows[:step], kind)
    out = np.empty((rows.shape[0], first.shape[-1]), dtype=first.dtype)
    out[: len(first)] = first
    del first
    for start in range(step, rows.shape[0], step):
        out[start : start + step] = gguf.dequantize(rows[start : start + step], kind)
    return out.reshape(*raw.shape[:-1], out.shape[-1])


def check_placement(
    path: Path, gguf_name: str, name: str, value: torch.Tensor, layout: dict[str, tuple[torch.dtype, list[int]]],
    written: set[str],
) -> None:
    """A converted tensor goes to a tensor of the layout, with its shape, for the first time; else ModelLoadError."""
    if name not in layout:
        raise ModelLoadError(f"GGUF file {path}: tensor {gguf_name} maps to {name}, which the model does not store")
    if list(value.shape) != layout[name][1]:
        raise ModelLoadError(f"GGUF file {path}: tensor {gguf_name} has shape {list(value.shape)} but the model's "
                             f"{name} is {layout[name][1]} (does the metadata match the tensors?)")
    if name in written:
        raise ModelLoadError(f"GGUF file {path}: two tensors map to {name}")


def write_whole_model(path: Path, folder: Path, tokenizer: Any, progress: Progress) -> None:
    """The whole-model conversion: transformers loads the GGUF into a model in memory, `write_checkpoint` writes it."""
    from ..load_check import check_loading_info, load_with_report
    from .checkpoint import write_checkpoint

    progress(PHASE, 0, 1)
    with reading(path):
        model, info = load_with_report(
            str(path.parent), gguf_file=path.name, trust_remote_code=False, ignore_mismatched_sizes=True
        )
    check_loading_info(path, model, info)
    write_checkpoint(model, folder, tokenizer)
    progress(PHASE, 1, 1)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """An exception from transformers or gguf-py while reading `path` becomes a one-line ModelLoadError."""
    try:
        yield
    except LrcError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {one_line(exc)} (a truncated or damaged file, or what "
                             "transformers' GGUF reader does not know: give the model as a safetensors folder)") from None
