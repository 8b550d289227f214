"""Streaming (--stream): the same output bytes as the in-memory path, one block resident at a time, resume, spilling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import lrc
from lrc.config import CompressionConfig
from lrc.errors import ConfigError
from lrc.sources import load_model
from lrc.stream import pipeline as stream_pipeline
from lrc.stream.layer_store import LayerStore
from lrc.stream.shards import StreamedBlocks, load_streamed, streamed_blocks
from tests.conftest import file_hashes, run_main, save_hunyuan_moe, save_tiny_model

VOLATILE = ("timing_s", "memory", "stream")  # differ between any two runs (timings, peak memory) or by mode


def comparable_report(folder: Path) -> dict:
    report = yaml.safe_load((folder / "lrc_report.yaml").read_text())
    for key in VOLATILE:
        report.pop(key, None)
    for key in ("stream", "stream_activation_gib"):  # the settings that choose the residency, nothing else
        report["settings"].pop(key)
    return report


def assert_same_output(a: Path, b: Path) -> None:
    ha, hb = file_hashes(a), file_hashes(b)
    assert sorted(ha) == sorted(hb)
    assert {k: v for k, v in ha.items() if k != "lrc_report.yaml"} == {k: v for k, v in hb.items() if k != "lrc_report.yaml"}
    assert comparable_report(a) == comparable_report(b)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("family,tie", [("llama", True), ("gpt2", True), ("bert", False), ("gemma2", False)])
def test_streamed_blocks_hold_the_loaded_weights(tmp_path, family, tie):
    """Each block read from the shards, and the resident parts, equal load_model's tensors (same dtype)."""
    folder = save_tiny_model(tmp_path / "m", family, tie=tie)
    reference = load_model(str(folder)).model.state_dict()
    model = load_streamed(str(folder)).model
    blocks = streamed_blocks(model)
    assert all(p.is_meta for p in blocks.layers.parameters())
    for index in range(len(blocks.layers)):
        blocks.load(index)
    streamed = model.state_dict()
    assert sorted(streamed) == sorted(reference)
    for name, tensor in reference.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name
    blocks.release(0)
    assert all(p.is_meta for p in blocks.layers[0].parameters())


CASES = [  # (family, method, samples): the default sparse recipe, plain loss-aware, Conv1D + tied, an encoder
    ("llama", "loss-aware", 4),
    ("llama", "sparse-dictionary", 4),
    ("gpt2", "sparse-dictionary", 8),
    ("bert", "loss-aware", 4),
    ("bert-mlm", "loss-aware", 4),  # its tensors named bert.*, and a head that is left out
    ("gpt_neox", "loss-aware", 36),  # its head: embed_out on disk, lm_head in transformers 5
]


@pytest.mark.parametrize("family,method,samples", CASES)
def test_stream_writes_the_in_memory_bytes(tmp_path, capsys, calib_file, family, method, samples):
    import contextlib

    if family == "bert-mlm":
        import transformers

        from tests.conftest import byte_tokenizer, tiny_config

        torch.manual_seed(0)
        transformers.BertForMaskedLM(tiny_config("bert")).save_pretrained(tmp_path / "m")
        byte_tokenizer().save_pretrained(tmp_path / "m")
        model = tmp_path / "m"
    else:
        model = save_tiny_model(tmp_path / "m", family, tie=family == "gpt2")
    args = ["compress", model, "--calib", calib_file, "--samples", samples, "--seq-len", 32, "--method", method,
            "--budget", 0.3, "--quiet"]
    for out, extra in (("memory", ()), ("stream", ("--stream",))):
        with pytest.warns(UserWarning, match="no task head") if family == "bert-mlm" else contextlib.nullcontext():
            assert run_main(capsys, *args, "-o", tmp_path / out, *extra)[0] == 0
    assert_same_output(tmp_path / "memory", tmp_path / "stream")
    report = yaml.safe_load((tmp_path / "stream" / "lrc_report.yaml").read_text())
    assert report["settings"]["stream"] is True and report["stream"]["block_loads"] > 0
    assert not (tmp_path / "cache" / "stream").exists() or not any((tmp_path / "cache" / "stream").iterdir())


def test_sharded_output_and_spilled_activations_same_bytes(tmp_path, calib_file, monkeypatch):
    """Several shards (+ index) and every hidden state spilled to disk (budget 0): still the in-memory bytes."""
    monkeypatch.setattr("lrc.io.checkpoint.SHARD_BYTES", 60_000)
    model = save_tiny_model(tmp_path / "m", "llama")
    config = CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, method="loss-aware", batch_size=2)
    lrc.compress(str(model), config, tmp_path / "memory")
    streamed = lrc.compress(str(model), config.replace(stream=True, stream_activation_gib=0.0), tmp_path / "stream")
    assert len(list((tmp_path / "memory").glob("model-*.safetensors"))) > 2
    assert_same_output(tmp_path / "memory", tmp_path / "stream")
    assert streamed.report["stream"]["spilled_activation_bytes"] >= 4 * 32 * 64 * 4 * 2  # >= two boundaries
    assert not list((tmp_path / "cache").rglob("activations-*"))  # spill files removed


def test_one_block_resident_at_a_time(tmp_path, calib_file, monkeypatch):
    """Whenever a block is read, every other block's weights are on the meta device (not in memory)."""
    model = save_tiny_model(tmp_path / "m", "llama", num_hidden_layers=3)
    load = StreamedBlocks.load
    resident_elsewhere = []

    def checked_load(self, index):
        resident_elsewhere.extend(i for i, layer in enumerate(self.layers)
                                  if i != index and any(not p.is_meta for p in layer.parameters()))
        return load(self, index)

    monkeypatch.setattr(StreamedBlocks, "load", checked_load)
    config = CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, stream=True)
    result = lrc.compress(str(model), config, tmp_path / "out")
    assert result.report["stream"]["block_loads"] >= 3 * 5  # stats, sweep (x2), decomposition, held-out, build
    assert resident_elsewhere == []


class Killed(Exception):
    pass


def test_killed_run_leaves_nothing_and_resumes(tmp_path, calib_file, monkeypatch):
    """A run killed after decomposing 2 of 4 layers writes nothing; the next run reuses the statistics and the
    2 layers' decompositions (no statistics pass, half the decomposition jobs) and writes the same bytes."""
    model = save_tiny_model(tmp_path / "m", "llama", num_hidden_layers=4)
    config = CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, method="loss-aware")
    lrc.compress(str(model), config, tmp_path / "memory")
    streamed = config.replace(stream=True)

    save = LayerStore.save_decompositions

    def killed_after_two(self, index, *args):
        save(self, index, *args)
        if index == 1:
            raise Killed

    monkeypatch.setattr(LayerStore, "save_decompositions", killed_after_two)
    with pytest.raises(Killed):
        lrc.compress(str(model), streamed, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left either
    monkeypatch.setattr(LayerStore, "save_decompositions", save)

    jobs, passes = [], []
    run_job = stream_pipeline.run_job
    monkeypatch.setattr(stream_pipeline, "run_job", lambda job, *a: jobs.append(job.owner) or run_job(job, *a))
    for name in ("collect_input_stats", "collect_output_stats"):
        original = getattr(stream_pipeline, name)
        monkeypatch.setattr(stream_pipeline, name,
                            lambda *a, _f=original, _n=name, **k: passes.append(_n) or _f(*a, **k))
    lrc.compress(str(model), streamed, tmp_path / "out")
    assert passes == []
    assert jobs and all(owner.startswith(("model.layers.2.", "model.layers.3.")) for owner in jobs)
    assert len(jobs) == 2 * 4  # 4 shared inputs per llama layer (q/k/v, o, gate/up, down), layers 2 and 3
    assert_same_output(tmp_path / "memory", tmp_path / "out")


def test_stream_refuses_what_it_cannot_do(tmp_path, capsys, calib_file):
    model = save_tiny_model(tmp_path / "m", "llama")
    args = ["compress", model, "--calib", calib_file, "--samples", 4, "--seq-len", 32, "--method", "loss-aware",
            "--allocator", "uniform", "--stream", "-o", tmp_path / "out"]
    code, _, err = run_main(capsys, *args, "--sequential")
    assert code == 2 and "without --stream" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="--calib"):
        lrc.compress(str(model), CompressionConfig(stream=True), tmp_path / "out")
    with pytest.raises(ConfigError, match="output folder"):
        lrc.compress(str(model), CompressionConfig(calib=str(calib_file), stream=True))
    moe = save_tiny_model(tmp_path / "moe", "qwen3_moe")
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        lrc.compress(str(moe), CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, stream=True),
                     tmp_path / "out")
    # no adapter (generic fallback): its experts are fused in transformers, one matrix per expert on disk
    generic = save_hunyuan_moe(tmp_path / "hunyuan")
    code, _, err = run_main(capsys, *[a if a != model else generic for a in args], "--quiet")
    assert code == 2 and err.startswith("error: streaming cannot read the experts of this mixture-of-experts model")
    assert not (tmp_path / "out").exists()


def test_a_second_run_on_the_same_store_is_refused_and_spills_of_a_killed_run_are_removed(tmp_path, monkeypatch):
    """Another process holding a store (a run of the same model, data and settings) refuses this one in a line
    (it would delete the files under it when it ends); a store opened cleans the spilled hidden states a killed
    run left."""
    import subprocess
    import sys

    from lrc.errors import OutputError

    stale = tmp_path / ("a" * 32) / "activations-x1"
    stale.mkdir(parents=True)
    (stale / "h-0.safetensors").write_bytes(b"x")
    store = LayerStore(tmp_path, "a" * 64, "b" * 64)
    assert not stale.exists()
    monkeypatch.chdir(tmp_path.parent)  # the same store by a relative path: this process's claim, not refused
    assert LayerStore(Path(tmp_path.name), "a" * 64, "b" * 64).claim is store.claim
    store.claim.release()
    lock = tmp_path / f".{'c' * 32}.lrc-lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); "
                               "print('held', flush=True); time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match="another lrc run \\(PID 4242\\) is streaming this model"):
            LayerStore(tmp_path, "c" * 64, "d" * 64)
    finally:
        holder.kill()
        holder.wait()
