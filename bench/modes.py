"""One compression of SmolLM2-135M run the ways lrc can run it: in memory, streamed (`--stream`), as N processes
(`--nproc N`). For each: the bytes it wrote (compared file by file with the first mode's), its time by phase
against the statistics pass, its peak resident memory, and the perplexity of what it wrote.

Each run is `python -m lrc compress MODEL --budget B --calib wiki.valid.tokens --samples S --seq-len L` in its
own process with OMP_NUM_THREADS=T (per process: `--nproc N` runs N processes of T threads; lrc writes the same
bytes for any number of processes at the same threads per process), then `python -m lrc eval OUT --data
wiki.test.raw --seq-len 512 --windows 24` on what it wrote (`--eval-seq-len`, `--windows`). The peak resident memory is the run's own
(`memory.peak_rss_bytes` in lrc_report.yaml: getrusage ru_maxrss of rank 0's process).

    python bench/modes.py                                                   # default recipe, 128 x 512, 2 threads
    python bench/modes.py --modes memory nproc2 --samples 32 --threads 1 --out bench/results/modes_nproc
    python bench/modes.py --modes memory stream --reuse memory=OUT          # OUT: an earlier run of the same command
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from results_files import cpu_description, write_results

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
GIB = 1024**3
PHASES = ("load_s", "calibration_s", "gradients_s", "decomposition_s", "allocation_s", "write_s", "total_s")


def mode_flags(mode: str) -> list[str]:
    """`memory` -> [], `stream` -> [--stream], `nprocN` -> [--nproc N]."""
    if mode == "memory":
        return []
    if mode == "stream":
        return ["--stream"]
    if mode.startswith("nproc") and mode[5:].isdigit():
        return ["--nproc", mode[5:]]
    raise SystemExit(f"unknown mode {mode!r}: memory, stream or nprocN")


def compress_command(args: argparse.Namespace, mode: str, out: Path) -> list[str]:
    command = [sys.executable, "-m", "lrc", "compress", args.model, "-o", str(out), "--budget", str(args.budget),
               "--calib", str(args.calib), "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--quiet"]
    return command + (["--method", args.method] if args.method else []) + mode_flags(mode)


def environment(args: argparse.Namespace) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}


def file_hashes(out: Path) -> dict[str, str]:
    """{file: sha256} of everything the run wrote but its report (which holds times and memory)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and p.name != "lrc_report.yaml"}


def check_reused(report: dict, args: argparse.Namespace, mode: str) -> None:
    """Stop unless the reused output was made with this run's settings and mode."""
    settings = report["settings"]
    wanted = {"budget": args.budget, "samples": args.samples, "seq_len": args.seq_len,
              "stream": mode == "stream", "calib": str(Path(args.calib).resolve())}
    wanted |= {"method": args.method} if args.method else {}
    wrong = {k: (settings.get(k), v) for k, v in wanted.items() if settings.get(k, False) != v}
    if wrong:
        raise SystemExit(f"the reused output {report['model']['spec']} differs from this run's settings: {wrong}")


def perplexity(args: argparse.Namespace, out: Path) -> float:
    command = [sys.executable, "-m", "lrc", "eval", str(out), "--data", str(args.data), "--seq-len",
               str(args.eval_seq_len), "--windows", str(args.windows), "--json", "--quiet"]
    done = subprocess.run(command, env=environment(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lrc eval {out} failed: {(done.stderr.strip().splitlines() or [''])[-1]}")
    return float(json.loads(done.stdout)["results"][0]["perplexity"])


def run_mode(args: argparse.Namespace, mode: str, work: Path, reused: dict[str, Path]) -> dict:
    out = reused.get(mode) or work / mode
    start = time.perf_counter()
    if mode not in reused:
        done = subprocess.run(compress_command(args, mode, out), env=environment(args), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode}: lrc compress failed: {(done.stderr.strip().splitlines() or [''])[-1]}")
    wall = time.perf_counter() - start
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    if mode in reused:
        check_reused(report, args, mode)
    row = {"mode": mode, "reused": str(out) if mode in reused else None, "wall_s": None if mode in reused else round(wall, 1),
           "timing_s": {k: report["timing_s"].get(k) for k in PHASES}, "peak_rss_bytes": report["memory"]["peak_rss_bytes"],
           "hashes": file_hashes(out), "perplexity": perplexity(args, out), "folder": str(out)}
    print({k: v for k, v in row.items() if k != "hashes"}, flush=True)
    return row


def table(rows: list[dict], args: argparse.Namespace) -> list[str]:
    first = rows[0]
    calib = first["timing_s"]["calibration_s"]
    lines = [
        f"{args.model}, budget {args.budget}, {args.method or 'default recipe'}, calibration {args.samples} x "
        f"{args.seq_len} tokens of {Path(args.calib).name}, perplexity on {Path(args.data).name} ({args.eval_seq_len}-token "
        f"windows, "
        f"first {args.windows}); {cpu_description()}, {args.threads} thread(s) per process, torch {torch.__version__}.",
        "F: the statistics pass (`calibration_s`, one forward over the calibration windows with the input Grams) "
        "of the same run.",
        "",
        "| mode | statistics (F) | gradients | decomposition | allocation | write | whole run | x F | peak RSS | "
        "files identical to the first row | perplexity |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        t = row["timing_s"]
        same = "-" if row is first else ("yes" if row["hashes"] == first["hashes"] else
                                          "no: " + ", ".join(k for k, v in row["hashes"].items() if first["hashes"].get(k) != v))
        mode = row["mode"] + (" (earlier run of the same command)" if row["reused"] else "")
        lines.append(
            f"| {mode} | {t['calibration_s']:.0f} s | {t['gradients_s']:.0f} s | {t['decomposition_s']:.0f} s | "
            f"{t['allocation_s']:.0f} s | {t['write_s']:.0f} s | {t['total_s']:.0f} s | {t['total_s'] / t['calibration_s']:.2f} | "
            f"{row['peak_rss_bytes'] / GIB:.2f} GiB | {same} | {row['perplexity']:.2f} |")
    lines.append("")
    lines.append(f"x F: the whole run over its own statistics pass (first row: {first['timing_s']['total_s'] / calib:.2f}).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--modes", nargs="+", default=["memory", "stream"])
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--method", default=None, help="default: the default recipe")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", default=str(DATA / "wiki.valid.tokens"))
    parser.add_argument("--data", default=str(DATA / "wiki.test.raw"))
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--reuse", nargs="*", default=[], metavar="MODE=DIR",
                        help="take MODE's row from DIR, an earlier `lrc compress` with the same settings")
    parser.add_argument("--work", default=None, help="where the outputs go (default: a temporary folder, removed)")
    parser.add_argument("--out", default="bench/results/modes")
    args = parser.parse_args()
    reused = {mode: Path(folder) for mode, folder in (item.split("=", 1) for item in args.reuse)}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lrc-modes-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = [run_mode(args, mode, work, reused) for mode in args.modes]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    data = {"settings": {k: v for k, v in vars(args).items() if k != "reuse"}, "rows": rows}
    write_results(args.out, table(rows, args), data)


if __name__ == "__main__":
    main()
