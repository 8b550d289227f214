"""Peak resident memory of `lrc compress` on config-built llama models at two depths (N and 2N layers).

Each model is built from a LlamaConfig with random weights (wide shapes: the weights and statistics
dominate), saved with a byte-level tokenizer, and compressed by `python -m lrc compress` in its own
subprocess; the peak resident set size is the one the run writes to its lrc_report.yaml (`memory`,
getrusage ru_maxrss of that process). A first row measures the process with lrc, torch and transformers
imported and nothing done, the constant under every run.

    python bench/memory.py                                  # writes bench/results/memory.md and .yaml
    python bench/memory.py --layers 2 --hidden 256 --intermediate 1024 --out /tmp/memory   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from results_files import write_results
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


def environment(threads: int) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}


def idle_peak_rss(threads: int) -> int:
    """Peak RSS (bytes) of a process that imports lrc's CLI (torch, transformers) and does nothing else."""
    code = "import resource, lrc.cli; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    done = subprocess.run([sys.executable, "-c", code], env=environment(threads), capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip().splitlines()[-1])


def compress_peak(folder: Path, out: Path, args: argparse.Namespace) -> tuple[dict, float]:
    """(the run's lrc_report.yaml, wall seconds) of `lrc compress` in its own process."""
    command = [sys.executable, "-m", "lrc", "compress", str(folder), "-o", str(out), "--calib", str(args.calib),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--method", args.method]
    start = time.perf_counter()
    done = subprocess.run(command, env=environment(args.threads), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lrc compress failed on {folder}:\n{done.stderr[-2000:]}")
    return yaml.safe_load((out / "lrc_report.yaml").read_text()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="N: models of N and 2N layers are measured")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--method", default="loss-aware")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=Path, default=WIKI_VALID)
    parser.add_argument("--out", default="bench/results/memory")
    args = parser.parse_args()
    idle = idle_peak_rss(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lrc-memory-") as tmp:
        for layers in (args.layers, 2 * args.layers):
            folder = Path(tmp) / f"llama-{layers}"
            weights = save_llama(folder, layers, args.hidden, args.intermediate, args.heads)
            report, wall = compress_peak(folder, Path(tmp) / f"out-{layers}", args)
            peak = report["memory"]["peak_rss_bytes"]
            rows.append({"layers": layers, "weights_bytes": weights, "peak_rss_bytes": peak, "wall_s": round(wall, 1),
                         "gradients_s": report["timing_s"].get("gradients_s")})
            print(rows[-1], flush=True)
    growth = rows[1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]
    lines = [f"Peak resident memory of `lrc compress --method {args.method}` (one process per run) on random llama models, "
             f"hidden {args.hidden}, MLP {args.intermediate}, {args.heads} heads, float32; calibration {args.samples} x "
             f"{args.seq_len} tokens; {platform.machine()}, {args.threads} threads, torch {torch.__version__}. "
             f"A process that only imports lrc peaks at {idle / GIB:.2f} GiB.", "",
             "| layers | weights (float32) | peak RSS | peak / weights | wall |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['layers']} | {r['weights_bytes'] / GIB:.2f} GiB | {r['peak_rss_bytes'] / GIB:.2f} GiB | "
              f"{r['peak_rss_bytes'] / r['weights_bytes']:.1f} | {r['wall_s']:.0f} s |" for r in rows]
    lines += ["", f"Doubling the depth multiplies the peak by {growth:.2f}."
              + (" lrc holds the whole model and every layer's statistics and decompositions until the allocation, "
                 "so the peak grows with depth." if growth >= 1.1 else "")]
    write_results(args.out, lines, {"idle_peak_rss_bytes": idle, "growth_2n_over_n": round(growth, 3), "rows": rows})


if __name__ == "__main__":
    main()
