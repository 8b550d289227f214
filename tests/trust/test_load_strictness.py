"""Load strictness through the CLI: a checkpoint that would load with made-up weights is refused, naming
the tensors; lrc outputs are checked against their rank map (lrc compress / lrc eval / lrc.load / plain
transformers after `import lrc`); pickle files and code beside the weights are never run. Every
pre-existing file is hashed before and after."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, LlamaModel

import lrc
from lrc.errors import ModelLoadError

from ..conftest import byte_tokenizer, file_hashes, run_main, save_tiny_model, tiny_compress_args, tiny_config


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def refused(capsys, root: Path, args: list, message: str) -> None:
    """`lrc ARGS` exits 2 with one `error:` line containing `message`; no file under root changed."""
    before = file_hashes(root)
    code, _, stderr = run_main(capsys, *args)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert file_hashes(root) == before


# --- input models ------------------------------------------------------------------------------------


def missing_tensor(folder):
    edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))


def extra_tensor(folder):
    edit_tensors(folder, lambda t: t.update({"model.layers.1.mlp.extra.weight": torch.zeros(3, 3)}))


def misshapen_tensor(folder):
    edit_tensors(folder, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 90)}))


def more_layers_declared(folder):
    edit_config(folder, lambda c: c.update(num_hidden_layers=3))


INPUT_CASES = [
    (missing_tensor, "missing 1 tensor(s) the LlamaForCausalLM architecture needs: model.layers.1.mlp.down_proj.weight"),
    (more_layers_declared, "missing 9 tensor(s) the LlamaForCausalLM architecture needs: model.layers.2."),
    (extra_tensor, "1 tensor(s) the LlamaForCausalLM architecture does not have: model.layers.1.mlp.extra.weight"),
    (misshapen_tensor, "model.layers.1.mlp.down_proj.weight (file [64, 90], model [64, 96])"),
]


@pytest.mark.parametrize(("damage", "message"), INPUT_CASES, ids=[d.__name__ for d, _ in INPUT_CASES])
def test_incomplete_or_mismatched_input_is_refused(capsys, tmp_path, calib_file, damage, message):
    model = save_tiny_model(tmp_path / "model", "llama")
    damage(model)
    refused(capsys, tmp_path, tiny_compress_args(model, calib_file, tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_are_not_missing(capsys, tmp_path, calib_file):
    model = save_tiny_model(tmp_path / "model", "llama", tie=True)
    assert "lm_head.weight" not in load_file(model / "model.safetensors")
    code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib_file, tmp_path / "out"))
    assert code == 0, stderr


def test_model_without_lm_head_is_refused(capsys, tmp_path, calib_file):
    LlamaModel(tiny_config("llama")).save_pretrained(tmp_path / "base")  # a decoder without its LM head
    byte_tokenizer().save_pretrained(tmp_path / "base")
    refused(capsys, tmp_path, tiny_compress_args(tmp_path / "base", calib_file, tmp_path / "out"),
            "holds a LlamaModel, which has no language-model head: loading it as LlamaForCausalLM would leave "
            "lm_head.weight random")


# --- lrc outputs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lrc_output(tmp_path_factory, calib_file) -> Path:
    root = tmp_path_factory.mktemp("lrc-output")
    model = save_tiny_model(root / "model", "llama")
    lrc.compress(str(model), lrc.CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, method="loss-aware"),
                 root / "out")
    return root / "out"


FACTOR = "model.layers.0.mlp.down_proj"


def delete_factor(folder):
    edit_tensors(folder, lambda t: t.pop(f"{FACTOR}.down.weight"))


def delete_rank_entry(folder):
    edit_config(folder, lambda c: c["quantization_config"]["ranks"].pop(FACTOR))


def delete_quantization_config(folder):
    edit_config(folder, lambda c: c.pop("quantization_config"))


def change_rank(folder):
    edit_config(folder, lambda c: c["quantization_config"]["ranks"].update({FACTOR: 25}))


def rank_of_missing_layer(folder):
    edit_config(folder, lambda c: c["quantization_config"]["ranks"].update({"model.layers.7.mlp.up_proj": 4}))


def delete_norm(folder):
    edit_tensors(folder, lambda t: t.pop("model.norm.weight"))


OUTPUT_CASES = [
    (delete_factor, f"lacks factor tensor(s) its rank map needs: {FACTOR}.down.weight"),
    (delete_rank_entry, f"holds factor tensors of {FACTOR}, which the rank map in config.json (quantization_config) "
                        "does not list"),
    (change_rank, f"do not match the rank map in config.json: {FACTOR}.down.weight (file [24, 96], rank map [25, 96])"),
    (rank_of_missing_layer, "names model.layers.7.mlp.up_proj, which is not a linear layer of LlamaForCausalLM"),
    (delete_norm, "lacks 1 tensor(s) the model needs: model.norm.weight"),
]


@pytest.mark.parametrize(("damage", "message"), OUTPUT_CASES, ids=[d.__name__ for d, _ in OUTPUT_CASES])
def test_damaged_lrc_output_is_refused_everywhere(capsys, tmp_path, lrc_output, calib_file, damage, message):
    folder = shutil.copytree(lrc_output, tmp_path / "out")
    damage(folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["ranks"][
        "model.layers.0.mlp.gate_proj"] > 0  # the rank map is there: the `lrc` quantizer runs
    refused(capsys, tmp_path, ["eval", folder, "--data", calib_file, "--seq-len", 32, "--windows", 1], message)
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        lrc.load(str(folder))
    with pytest.raises(ModelLoadError, match="lrc output|rank map"):
        AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, after `import lrc`


def test_lrc_output_without_its_rank_map_is_refused(capsys, tmp_path, lrc_output, calib_file):
    folder = shutil.copytree(lrc_output, tmp_path / "out")
    delete_quantization_config(folder)
    message = "is an lrc output but its config.json has no quantization_config (the rank map)"
    refused(capsys, tmp_path, ["eval", folder, "--data", calib_file, "--seq-len", 32, "--windows", 1], message)
    refused(capsys, tmp_path, tiny_compress_args(folder, calib_file, tmp_path / "again"), message)


def test_the_library_says_it_in_one_error(tmp_path, lrc_output):
    # not transformers' logged table of the unexpected keys first
    folder = shutil.copytree(lrc_output, tmp_path / "out")
    delete_quantization_config(folder)
    transformers.logging.set_verbosity_warning()  # transformers' default (lrc's CLI, run in this process, lowers it)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.raises(ModelLoadError, match="has no quantization_config"):
            lrc.load(str(folder))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]
    assert transformers.logging.get_verbosity() == transformers.logging.WARNING  # the user's setting, restored


# --- pickle and code beside the weights -------------------------------------------------------------


class RunsOnUnpickle:
    """Unpickling this creates the file `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_weights_are_never_loaded(capsys, tmp_path, calib_file):
    marker = tmp_path / "unpickled"
    model = save_tiny_model(tmp_path / "model", "llama")
    names = list(load_file(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(RunsOnUnpickle(marker)))
    save_file({"x": torch.zeros(1)}, model / "adapter.safetensors")
    refused(capsys, tmp_path, tiny_compress_args(model, calib_file, tmp_path / "out"),
            "holds no model.safetensors or model.safetensors.index.json (found adapter.safetensors, "
            "pytorch_model.bin; lrc never loads pickle files like pytorch_model.bin)")
    index = {"metadata": {}, "weight_map": {name: "pytorch_model.bin" for name in names}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(capsys, tmp_path, tiny_compress_args(model, calib_file, tmp_path / "out"),
            "model.safetensors.index.json points at pytorch_model.bin, not a safetensors file in the folder")
    assert not marker.exists()


def test_pickles_and_code_beside_safetensors_are_ignored(capsys, tmp_path, calib_file):
    marker = tmp_path / "ran"
    model = save_tiny_model(tmp_path / "model", "llama")
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (model / name).write_bytes(pickle.dumps(RunsOnUnpickle(marker)))
    (model / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    edit_config(model, lambda c: c.update(auto_map={"AutoModelForCausalLM": "evil.Model", "AutoConfig": "evil.Config"}))
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.Tokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    before = file_hashes(tmp_path)
    code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib_file, tmp_path / "out"))
    assert code == 0, stderr
    assert not marker.exists()
    assert {k: v for k, v in file_hashes(tmp_path).items() if not k.startswith("out/")} == before


def test_custom_architecture_code_is_not_run(capsys, tmp_path, calib_file):
    marker = tmp_path / "ran"
    model = save_tiny_model(tmp_path / "model", "llama")
    (model / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    edit_config(model, lambda c: c.update(model_type="evil", auto_map={"AutoModelForCausalLM": "evil.Model",
                                                                        "AutoConfig": "evil.Config"}))
    refused(capsys, tmp_path, tiny_compress_args(model, calib_file, tmp_path / "out"), "contains custom code")
    assert not marker.exists()


def test_index_naming_a_missing_shard_is_refused(capsys, tmp_path, calib_file):
    model = save_tiny_model(tmp_path / "model", "llama")
    names = list(load_file(model / "model.safetensors"))
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    weight_map = {name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(names)}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    refused(capsys, tmp_path, tiny_compress_args(model, calib_file, tmp_path / "out"),
            "model.safetensors.index.json points at model-00002-of-00002.safetensors, which is missing")


def test_encoder_task_head_is_left_out_not_filled(tmp_path, calib_file, capsys):
    """A BertForMaskedLM checkpoint (as bert-base-uncased ships) compresses: its `cls.*` head is not part of
    the encoder lrc loads, so it is left out of the output; the encoder's own tensors are still all required."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    folder = tmp_path / "bert-mlm"
    BertForMaskedLM(tiny_config("bert")).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    assert any(k.startswith("cls.") for k in load_file(folder / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"is a BertForMaskedLM: .* no task head \(cls\.predictions"):
        code, _, stderr = run_main(capsys, *tiny_compress_args(folder, calib_file, out, "--samples", 24))
    assert code == 0, stderr
    written = load_file(out / "model.safetensors")
    assert written and not any(k.startswith(("cls.", "pooler.")) for k in written)  # no pooler in, none made up
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    ids = torch.arange(24).reshape(1, 24) * 7 % 250
    model = lrc.load(str(out)).model
    assert model.pooler is None
    expected = model(input_ids=ids).last_hidden_state
    for kwargs in ({}, {"trust_remote_code": True}):  # transformers builds it without a pooler too
        loaded = AutoModel.from_pretrained(out, **kwargs)
        assert loaded.pooler is None
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, expected, rtol=0, atol=0)

    edit_tensors(folder, lambda t: t.pop("bert.encoder.layer.1.output.dense.weight"))
    refused(capsys, tmp_path, tiny_compress_args(folder, calib_file, tmp_path / "out2", "--samples", 24),
            "encoder.layer.1.output.dense.weight")
