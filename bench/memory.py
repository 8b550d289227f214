"""Peak resident memory of `lrc compress`, in memory and streamed (--stream), on config-built llama models.

Each model is built from a LlamaConfig with random weights, saved with a byte-level tokenizer, and
compressed by `python -m lrc compress` in its own subprocess; the peak resident set size is the one the
run writes to its lrc_report.yaml (`memory`: VmHWM, the peak of that process's own memory; getrusage's
ru_maxrss would start from this benchmark's own resident set, which a child inherits at fork).

1. Depth: N and 2N layers, each in memory and streamed; the streamed peaks must differ by less than 10%,
   and both modes must write the same checkpoint bytes.
2. A cap: a deeper model whose float32 weights exceed a memory cap set on the child process
   (resource.setrlimit(RLIMIT_DATA) in preexec_fn: it bounds private writable memory, i.e. every tensor,
   heap and anonymous mapping; RLIMIT_AS would also count the address space of libraries and read-only
   file mappings, and Linux does not enforce RLIMIT_RSS). Streamed under the cap it completes with the
   bytes of the uncapped in-memory run; in memory under the same cap it fails.

    python bench/memory.py                      # writes bench/results/memory.md and .yaml (about 30 min, 2 busy cores)
    python bench/memory.py --layers 2 --cap-layers 0 --out /tmp/memory    # a quick look, no capped runs
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from results_files import cpu_description, write_results
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
GIB = 1024**3


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + <s>, </s> (no merges): 258 ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_llama(folder: Path, layers: int, hidden: int, intermediate: int, heads: int) -> int:
    """A random llama of `layers` blocks saved (float32) in `folder`; returns its weight bytes."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


CACHE: dict[str, str] = {}  # LRC_CACHE_DIR of the runs: a folder of this benchmark's own (set in main)


def environment(threads: int) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)} | CACHE


def idle_peak_rss(threads: int) -> int:
    """Peak RSS (bytes) of a process that imports lrc's CLI (torch, transformers) and does nothing else."""
    code = "import lrc.cli, torch; from lrc.peak_memory import peak_memory; print(peak_memory(torch.device('cpu'))['peak_rss_bytes'])"
    done = subprocess.run([sys.executable, "-c", code], env=environment(threads), capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip().splitlines()[-1])


def compress_peak(folder: Path, out: Path, args: argparse.Namespace, method: str, stream: bool,
                  cap: int | None = None) -> tuple[dict | None, float, str]:
    """(the run's lrc_report.yaml or None if it failed, wall seconds, its last stderr line) of `lrc compress` in its
    own process; `cap`: bytes of RLIMIT_DATA set on that process before it starts (see the module docstring)."""
    recipe = out.with_suffix(".yaml")
    recipe.write_text(yaml.safe_dump(recipe_fields(args, stream)))
    command = [sys.executable, "-m", "lrc", "compress", str(folder), "-o", str(out), "--calib", str(args.calib),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--method", method, "--quiet",
               "--recipe", str(recipe)]

    def limit() -> None:
        if cap is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    start = time.perf_counter()
    done = subprocess.run(command, env=environment(args.threads), capture_output=True, text=True, preexec_fn=limit)
    wall = time.perf_counter() - start
    last = (done.stderr.strip().splitlines() or [""])[-1][:160]
    if done.returncode != 0:
        return None, wall, last
    return yaml.safe_load((out / "lrc_report.yaml").read_text()), wall, last


def recipe_fields(args: argparse.Namespace, stream: bool) -> dict:
    """The recipe of a run: the excluded projections, and for a streamed run the activation budget."""
    fields: dict = {"exclude": args.exclude, "heldout_windows": args.heldout_windows}
    return fields | ({"stream": True, "stream_activation_gib": args.activation_gib} if stream else {})


def weight_hashes(out: Path) -> dict[str, str]:
    """{file: sha256} of the checkpoint's weights and config (what `same bytes` compares)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json")}


def depth_rows(tmp: Path, args: argparse.Namespace, resumed: list[dict]) -> list[dict]:
    """N and 2N layers, in memory and streamed (four processes at once): peak RSS of each, and whether both modes
    wrote the same bytes; with args.resume, the N-layer model's killed-and-resumed run into `resumed`."""
    rows = []
    pairs = [(layers, stream) for layers in (args.layers, 2 * args.layers) for stream in (False, True)]
    folders = {layers: tmp / f"llama-{layers}" for layers in (args.layers, 2 * args.layers)}
    weights = {layers: save_llama(f, layers, args.hidden, args.intermediate, args.heads) for layers, f in folders.items()}
    outs = {(layers, stream): tmp / f"out-{layers}-{'stream' if stream else 'memory'}" for layers, stream in pairs}
    with ThreadPoolExecutor(len(pairs)) as pool:  # the four processes side by side: peaks are per process
        done = list(pool.map(lambda p: compress_peak(folders[p[0]], outs[p], args, args.method, p[1]), pairs))
    hashes = {}
    for (layers, stream), (report, wall, last) in zip(pairs, done):
        if report is None:
            raise SystemExit(f"lrc compress failed on {folders[layers]}: {last}")
        hashes[layers, stream] = weight_hashes(outs[layers, stream])
        rows.append({"layers": layers, "mode": "stream" if stream else "in memory", "weights_bytes": weights[layers],
                     "peak_rss_bytes": report["memory"]["peak_rss_bytes"], "wall_s": round(wall, 1),
                     "timing_s": report["timing_s"], "same_bytes": None})
    for row in rows:
        row["same_bytes"] = hashes[row["layers"], False] == hashes[row["layers"], True]
        print(row, flush=True)
    if args.resume:
        resumed.append(resume_row(folders[args.layers], tmp, args, args.layers, hashes[args.layers, False]))
    return rows


def resume_row(folder: Path, tmp: Path, args: argparse.Namespace, layers: int, reference: dict[str, str]) -> dict:
    """A streamed run SIGKILLed once half the layers' decompositions are stored, then run again: what it left,
    how long each took, and whether the resumed run wrote the reference bytes."""
    cache, out = tmp / "cache-resume", tmp / "out-resume"
    recipe = tmp / "resume.yaml"
    recipe.write_text(yaml.safe_dump(recipe_fields(args, True)))
    command = [sys.executable, "-m", "lrc", "compress", str(folder), "-o", str(out), "--calib", str(args.calib),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--method", args.method, "--quiet",
               "--recipe", str(recipe), "--cache-dir", str(cache)]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=environment(args.threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while child.poll() is None and len(list(cache.glob("stream/*/*/layer-*.safetensors"))) < layers // 2:
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = time.perf_counter() - start
    left = out.exists()  # (a killed run inside the atomic write leaves a hidden .NAME.lrc-tmp-* folder, removed by the next)
    stored = len(list(cache.glob("stream/*/*/layer-*.safetensors")))
    report, wall, last = compress_peak_cmd(command, args)
    if report is None:
        raise SystemExit(f"the resumed run failed: {last}")
    row = {"layers": layers, "killed_after_s": round(killed_at, 1), "layers_stored_when_killed": stored,
           "output_left_by_killed_run": left, "resumed_wall_s": round(wall, 1),
           "resumed_timing_s": report["timing_s"], "same_bytes": weight_hashes(out) == reference}
    shutil.rmtree(out)
    shutil.rmtree(cache)
    print(row, flush=True)
    return row


def compress_peak_cmd(command: list[str], args: argparse.Namespace) -> tuple[dict | None, float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, env=environment(args.threads), capture_output=True, text=True)
    wall = time.perf_counter() - start
    out = Path(command[command.index("-o") + 1])
    if done.returncode != 0:
        return None, wall, (done.stderr.strip().splitlines() or [""])[-1][:160]
    return yaml.safe_load((out / "lrc_report.yaml").read_text()), wall, ""


def capped_rows(tmp: Path, args: argparse.Namespace) -> list[dict]:
    """A model whose float32 weights exceed the cap: uncapped in memory (the reference bytes), capped streamed,
    capped in memory (expected to fail: the cap is real)."""
    folder = tmp / "llama-capped"
    weights = save_llama(folder, args.cap_layers, args.hidden, args.intermediate, args.heads)
    cap = int(args.cap_gib * GIB)
    rows, hashes = [], {}
    runs = [("in memory", False, None), ("stream", True, cap), ("in memory", False, cap)]
    with ThreadPoolExecutor(len(runs)) as pool:  # the three processes side by side (each has its own peak and cap)
        done = list(pool.map(lambda i: compress_peak(folder, tmp / f"out-capped-{i}", args, args.cap_method,
                                                     runs[i][1], runs[i][2]), range(len(runs))))
    for i, ((name, _, limit), (report, wall, last)) in enumerate(zip(runs, done)):
        out = tmp / f"out-capped-{i}"
        row = {"layers": args.cap_layers, "mode": name, "cap_bytes": limit, "weights_bytes": weights,
               "completed": report is not None, "wall_s": round(wall, 1)}
        if report is not None:
            row["peak_rss_bytes"] = report["memory"]["peak_rss_bytes"]
            hashes[i] = weight_hashes(out)
            shutil.rmtree(out)
        else:
            row["error"] = last
        rows.append(row)
        print(row, flush=True)
    if 0 in hashes and 1 in hashes:
        rows[1]["same_bytes_as_uncapped"] = hashes[0] == hashes[1]
    shutil.rmtree(folder)
    return rows


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="N: models of N and 2N layers are measured (0: none)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--heldout-windows", type=int, default=1)
    parser.add_argument("--exclude", nargs="*", default=[r"(^|\.)lm_head$", r"mlp\.down_proj$"],
                        help="recipe `exclude`: the default keeps down_proj (input width = MLP width) dense, so the "
                             "widest targeted input is the hidden size and few calibration tokens suffice")
    parser.add_argument("--method", default="loss-aware")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activation-gib", type=float, default=1 / 64, help="streamed runs' in-memory activations")
    parser.add_argument("--cap-layers", type=int, default=18, help="layers of the model run under the cap (0: none)")
    parser.add_argument("--cap-gib", type=float, default=0.85, help="RLIMIT_DATA of the capped runs")
    parser.add_argument("--cap-method", default="svd")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="skip the kill-and-resume run")
    parser.add_argument("--calib", type=Path, default=WIKI_VALID, help="its first 200,000 characters are used")
    parser.add_argument("--out", default="bench/results/memory")
    args = parser.parse_args()
    idle = idle_peak_rss(args.threads)
    with tempfile.TemporaryDirectory(prefix="lrc-memory-") as tmp:
        calib = Path(tmp) / "calib.txt"  # enough for the windows; tokenizing all of wiki.valid costs ~0.4 GiB
        calib.write_text(args.calib.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
        args.calib = calib
        CACHE["LRC_CACHE_DIR"] = str(Path(tmp) / "lrc-cache")
        resumed: list[dict] = []
        depth = depth_rows(Path(tmp), args, resumed) if args.layers else []
        capped = capped_rows(Path(tmp), args) if args.cap_layers else []
    peaks = {r["layers"]: r["peak_rss_bytes"] for r in depth if r["mode"] == "stream"}
    memory_peaks = {r["layers"]: r["peak_rss_bytes"] for r in depth if r["mode"] == "in memory"}
    growth = peaks[2 * args.layers] / peaks[args.layers] if depth else 0.0
    memory_growth = memory_peaks[2 * args.layers] / memory_peaks[args.layers] if depth else 0.0
    setup = (f"random llama models, hidden {args.hidden}, MLP {args.intermediate}, {args.heads} heads, float32, "
             f"every projection but down_proj targeted; {args.heldout_windows} held-out window; "
             f"calibration {args.samples} x {args.seq_len} tokens; streamed runs keep {args.activation_gib * 1024:.0f} MiB "
             f"of hidden states in memory and spill the rest; {cpu_description()}, {args.threads} threads, "
             f"torch {torch.__version__}. One process per run; peak RSS is the run's own report (VmHWM of its process). "
             f"A process that only imports lrc peaks at {gib(idle)}.")
    lines = [f"`lrc compress` in memory and with `--stream`: {setup}"]
    if depth:
        lines += ["", f"`--method {args.method}`:", "",
                  "| layers | mode | weights (float32) | peak RSS | wall | same bytes in both modes |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['layers']} | {r['mode']} | {gib(r['weights_bytes'])} | {gib(r['peak_rss_bytes'])} | "
                  f"{r['wall_s']:.0f} s | {'yes' if r['same_bytes'] else 'NO'} |" for r in depth]
        lines += ["", f"Doubling the depth multiplies the streamed peak by {growth:.3f} and the in-memory peak by "
                  f"{memory_growth:.2f}."]
    for r in resumed:
        full = next(d for d in depth if d["layers"] == r["layers"] and d["mode"] == "stream")
        lines += ["", f"Resume: the {r['layers']}-layer streamed run, SIGKILLed {r['killed_after_s']:.0f} s in (once "
                  f"{r['layers_stored_when_killed']} of {r['layers']} layers' decompositions were stored), left "
                  f"{'a partial output' if r['output_left_by_killed_run'] else 'no output'}; "
                  f"run again, it took {r['resumed_wall_s']:.0f} s against {full['wall_s']:.0f} s for a whole streamed "
                  f"run (statistics passes skipped: decomposition {r['resumed_timing_s'].get('decomposition_s', 0):.0f} s "
                  f"against {full['timing_s'].get('decomposition_s', 0):.0f} s) and wrote "
                  f"{'the same bytes' if r['same_bytes'] else 'DIFFERENT bytes'}."]
    if capped:
        lines += ["", f"Under a memory cap (`--method {args.cap_method}`, {args.cap_layers} layers): the cap is "
                  "RLIMIT_DATA set in the child process before it starts (`resource.setrlimit`), which bounds the "
                  "process's private writable memory (heap, anonymous mappings: every tensor). RLIMIT_AS would also "
                  "count read-only file mappings and the libraries' address space; RLIMIT_RSS is not enforced by Linux.",
                  "", "| mode | cap (RLIMIT_DATA) | weights (float32) | result | peak RSS | wall |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in capped:
            result = ("completed" + (", same bytes as the uncapped run" if r.get("same_bytes_as_uncapped") else "")
                      if r["completed"] else f"failed: `{r['error']}`")
            lines.append(f"| {r['mode']} | {gib(r['cap_bytes']) if r['cap_bytes'] else 'none'} | "
                         f"{gib(r['weights_bytes'])} | {result} | "
                         f"{gib(r['peak_rss_bytes']) if 'peak_rss_bytes' in r else '-'} | {r['wall_s']:.0f} s |")
    write_results(args.out, lines, {"idle_peak_rss_bytes": idle, "stream_growth_2n_over_n": round(growth, 3),
                                    "memory_growth_2n_over_n": round(memory_growth, 3), "depth": depth, "resume": resumed,
                                    "capped": capped})


if __name__ == "__main__":
    main()
