"""torch.distributed runs (gloo, CPU): two processes write the same bytes as one; one rank's error stops all.

The two-process runs go through `lrc compress --nproc 2` (torch's elastic launcher, as torchrun), each rank
with one thread, against the same command run in this process with one thread.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import subprocess

import pytest
import torch
import yaml

from lrc.cli import main
from lrc.distributed import pack_jobs, shard_batches
from lrc.engine import decompose_all
from lrc.engine.executors import EXECUTORS

from .conftest import file_hashes, lrc_command, lrc_env, run_main, save_tiny_model


def run_ranks(*args: object, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`lrc ARGS --nproc 2` in a subprocess, one thread per rank."""
    env = lrc_env() | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([*lrc_command(*args), "--nproc", "2"], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def report_without_measurements(folder):
    report = yaml.safe_load((folder / "lrc_report.yaml").read_text())
    report.pop("timing_s")
    report.pop("memory")  # measurements of the run, not results
    return report


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_processes_write_the_bytes_of_one(tmp_path, calib_file, capsys, one_thread):
    model = save_tiny_model(tmp_path / "model", "llama")
    recipe = tmp_path / "recipe.yaml"
    # 5 windows in batches of 2: global batches 0, 2 on rank 0 and 1 on rank 1 (rank 1 idles at the last step);
    # the gradient pass runs 5 batches of 1 window. The default method (sparse-dictionary, needs gradients).
    recipe.write_text("samples: 5\nseq_len: 32\nbatch_size: 2\nheldout_windows: 2\n")
    args = ["compress", model, "--calib", calib_file, "--recipe", recipe, "--budget", "0.3"]
    code, _, err = run_main(capsys, *args, "-o", tmp_path / "one")
    assert code == 0, err
    result = run_ranks(*args, "-o", tmp_path / "two", "--json")
    assert result.returncode == 0, result.stderr
    # the sparse options near the choices are refitted, each rank a share (rank 0's progress is the log)
    refits = [int(re.search(r"\] refine 0/(\d+): started", log)[1]) for log in (err, result.stderr)]
    assert refits[0] >= 2 and refits[1] < refits[0]
    one, two = file_hashes(tmp_path / "one"), file_hashes(tmp_path / "two")
    assert one.keys() == two.keys()
    assert {k: v for k, v in one.items() if k != "lrc_report.yaml"} == {
        k: v for k, v in two.items() if k != "lrc_report.yaml"}
    assert report_without_measurements(tmp_path / "one") == report_without_measurements(tmp_path / "two")
    assert result.stdout.count("\n") == 1 and '"output"' in result.stdout  # rank 0's JSON, once; rank 1 silent


def forked_ranks(args: list[object], world: int = 2, timeout: float = 120,
                 env: dict[int, dict[str, str]] | None = None) -> list[int | None]:
    """Exit codes of `lrc ARGS` run by `world` forked copies of this process as the ranks of one gloo job
    (None: still running after `timeout` s, then killed), rank r with the environment variables env[r].
    Forks start at once: nothing to import again."""
    import multiprocessing
    import os
    import socket

    from lrc.cli import main

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def rank_main(rank: int) -> None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        os.environ.update((env or {}).get(rank, {}))
        torch.set_num_threads(1)
        os._exit(main([str(a) for a in args]))

    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=rank_main, args=(rank,)) for rank in range(world)]
    for proc in procs:
        proc.start()
    codes: list[int | None] = []
    for proc in procs:
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            codes.append(None)
        else:
            codes.append(proc.exitcode)
    return codes


def test_an_error_on_one_rank_stops_every_rank(tmp_path, calib_file, capfd):
    """Only rank 0 checks the output folder: its error must reach rank 1 (already calibrating), not hang it."""
    model = save_tiny_model(tmp_path / "model", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capfd.readouterr()
    codes = forked_ranks(["compress", model, "--calib", calib_file, "--samples", 4, "--seq-len", 32, "--method",
                          "loss-aware", "-o", out, "--quiet"])
    assert codes == [2, 2]  # the same error, hence the same exit code, on both ranks
    err = capfd.readouterr().err
    assert err.count("error:") == 1 and "exists and is not empty" in err  # printed once, by rank 0
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_three_ranks_write_the_bytes_of_one(tmp_path, calib_file, capsys, one_thread):
    """Loss-aware on 7 windows in batches of 2 over 3 ranks: rank 0 runs global batches 0 and 3, rank 1
    batch 1, rank 2 batch 2; the gradient pass, 7 batches of 1, leaves ranks 1 and 2 idle at the last step."""
    model = save_tiny_model(tmp_path / "model", "llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("samples: 7\nseq_len: 32\nbatch_size: 2\nheldout_windows: 2\nmethod: loss-aware\n")
    args = ["compress", model, "--calib", calib_file, "--recipe", recipe, "--budget", "0.3", "--quiet"]
    code, _, err = run_main(capsys, *args, "-o", tmp_path / "one")
    assert code == 0, err
    assert forked_ranks([*args, "-o", tmp_path / "three"], world=3) == [0, 0, 0]
    one, three = file_hashes(tmp_path / "one"), file_hashes(tmp_path / "three")
    assert one.pop("lrc_report.yaml") and three.pop("lrc_report.yaml") and one == three
    assert report_without_measurements(tmp_path / "one") == report_without_measurements(tmp_path / "three")


def test_ranks_price_the_latency_objective_by_rank_0s_measurements(tmp_path, calib_file):
    """Each rank with its own cache folder: rank 0 measures the layer times and the rest of the model, rank 1
    prices by rank 0's numbers (it measures and saves nothing), so both allocate alike and the run finishes."""
    model = save_tiny_model(tmp_path / "model", "llama", hidden_size=128, intermediate_size=256)  # matmuls to time
    caches = {rank: tmp_path / f"cache{rank}" for rank in (0, 1)}
    codes = forked_ranks(["compress", model, "--calib", calib_file, "--samples", 8, "--seq-len", 32, "--method",
                          "loss-aware", "--objective", "latency", "--latency-tokens", 64, "--budget", 0.02,
                          "-o", tmp_path / "out", "--quiet"],
                         env={rank: {"LRC_CACHE_DIR": str(folder)} for rank, folder in caches.items()})
    assert codes == [0, 0]
    assert list((caches[0] / "latency").glob("*.json"))
    assert not (caches[1] / "latency").exists()
    report = yaml.safe_load((tmp_path / "out" / "lrc_report.yaml").read_text())
    assert report["objective"] == "latency"


def test_batches_go_round_robin():
    windows = torch.arange(7)[:, None].expand(7, 3)
    batches, indices, steps = shard_batches(windows, 2)  # one process: every batch, in order
    assert indices == [0, 1, 2, 3] and steps == 4
    assert torch.equal(torch.cat(batches), windows)
    assert shard_batches(windows[:0], 2) == ([], [], 0)


def brute_force_makespan(costs: list[float], bins: int) -> float:
    return min(max(sum(c for c, b in zip(costs, assign) if b == k) for k in range(bins))
               for assign in itertools.product(range(bins), repeat=len(costs)))


def test_bin_packing_is_a_deterministic_partition_within_four_thirds_of_the_best():
    rng = random.Random(0)
    for _ in range(30):
        bins = rng.choice([2, 3])
        jobs = [(f"job{i}", float(rng.randint(1, 50))) for i in range(rng.randint(1, 7))]
        packed = pack_jobs(jobs, bins)
        assert sorted(n for b in packed for n in b) == sorted(n for n, _ in jobs)
        assert pack_jobs(list(reversed(jobs)), bins) == packed  # the input order does not matter
        cost = dict(jobs)
        makespan = max(sum(cost[n] for n in b) for b in packed)
        assert makespan <= 4 / 3 * brute_force_makespan([c for _, c in jobs], bins) + 1e-9


def test_executors_give_the_same_decompositions(llama_dir, calib_file):
    """Serial (model order) and device (largest first, here on the CPU) runs give the same bytes."""
    from lrc.config import CompressionConfig
    from lrc.sources import load_model
    from lrc.stats.collect import collect_statistics

    assert {"serial", "device", "distributed"} <= set(EXECUTORS.names())
    loaded = load_model(str(llama_dir))
    config = CompressionConfig(method="loss-aware", allocator="knapsack", calib=str(calib_file), samples=4, seq_len=32)
    stats = collect_statistics(loaded, config)
    serial = decompose_all(loaded, config, stats, executor="serial")
    device = decompose_all(loaded, config, stats, executor="device")
    assert list(serial.decompositions) == list(device.decompositions)
    for name, dec in serial.decompositions.items():
        other = device.decompositions[name]
        assert torch.equal(dec.up_full, other.up_full) and torch.equal(dec.down_full, other.down_full)
        assert torch.equal(dec.errors, other.errors)
        assert torch.equal(serial.output_errors[name], device.output_errors[name])


def test_launching_ranks_leaves_the_callers_environment(tmp_path, monkeypatch, capfd):
    """`--nproc` sets each rank's OMP_NUM_THREADS; an in-process call leaves the caller's environment as it was."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code = main(["compress", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--nproc", "1"])
    assert code == 2 and "model not found" in capfd.readouterr().err  # the rank's own message
    assert "OMP_NUM_THREADS" not in os.environ


def test_a_rank_killed_from_outside_is_named(monkeypatch, tmp_path):
    """SIGKILL of one rank (the out-of-memory killer): the launcher names that rank and its signal (exit 1), not
    the broken connection its peer then saw."""
    import time

    import torch.distributed.launcher.api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from lrc.cli.launch import RankKilled, launch_ranks

    def killed(config, entrypoint):
        def run(*args):
            peer = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(tmp_path / "none"))
            victim = ProcessFailure(local_rank=1, pid=2, exitcode=-9, error_file=str(tmp_path / "none"))
            victim.timestamp, peer.timestamp = int(time.time()) - 1, int(time.time())
            raise ChildFailedError("lrc", {0: peer, 1: victim})
        return run

    monkeypatch.setattr(torch.distributed.launcher.api, "elastic_launch", killed)
    with pytest.raises(RankKilled, match="process 1 of the 2 was killed by SIGKILL .*out-of-memory killer") as error:
        launch_ranks(2, ["compress", "m", "-o", "o"])
    assert error.value.exit_code == 1
