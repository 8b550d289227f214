"""What a compressed model costs where it runs: bytes in memory and tokens per second, against dense.

For the dense model and lrc outputs (by default SmolLM2-135M, the default recipe and pure low rank at
budget 0.3), in float32 and bfloat16, each model in its own process, loaded with plain transformers after
`import lrc` (`AutoModelForCausalLM.from_pretrained(folder, dtype=...)`):
- file: the safetensors bytes at that dtype (the files on disk for the dtype they were written in; for
  another dtype, the same tensors with floating values at its width: what `--dtype` would write);
- tensors: bytes held by the model's tensors after loading (parameters, buffers and any tensor a module
  keeps, each storage once), and after the run (caches built on first use included);
- peak RSS: the process's peak resident set during a 512-token prefill and the decode steps (VmHWM, reset
  after loading and a warm-up: the model, activations, KV cache and transients, plus the Python / torch
  runtime, and whatever heap the process keeps resident after freeing it: the bench hands nothing back to
  the OS itself, so this is what a user's process holds; lrc's loader returns what loading freed, see
  lrc.forms.fused.release_freed_heap, transformers' own loader for the dense model does not);
- prefill tok/s (one 512-token forward that, as transformers' generate() does, computes the logits of the
  last position only; `--all-logits` for all 512, as a perplexity evaluation does) and decode tok/s (greedy steps with the KV cache, one over the
  median step time of a run, so a stall of the machine within a run does not count), measured in one more
  process per dtype that loads every model and runs them in turn, `--alternations` rounds with the order
  rotated: the models of a round run seconds apart. Reported: each model's median run, and against dense
  the median of the per-round ratios (the figure to read), the ratio of the fastest runs and the range of
  the per-round ratios. On this project's shared 2-core VM the speed changes from second to second (dense
  bfloat16 prefill 1181-2409 tokens/s within one run), so a fastest-run ratio can be one lucky burst.
  (`--alternations 0`: speeds from the per-model processes, the fastest of `--repeats` runs each.)
Memory rounds interleave the models too, so a change in the machine's load touches all of them alike.

    python bench/runtime.py --rounds 2                   # writes bench/results/runtime.md and .yaml
    python bench/runtime.py --models dense=FOLDER mine=OUT --dtypes float32 --rounds 1 --out /tmp/rt
    python bench/runtime.py --rows bench/results/runtime.yaml      # the table again from the saved rows
    python bench/runtime.py --compile --out bench/results/runtime_compiled   # forwards under torch.compile
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.raw"
MIB = 1024**2
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def file_bytes(folder: Path, dtype_bytes: int) -> tuple[int, int]:
    """(bytes of the safetensors files on disk, bytes with every floating tensor at `dtype_bytes` per value)."""
    on_disk = at_dtype = 0
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        on_disk += path.stat().st_size
        at_dtype += 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            width = FLOAT_DTYPES.get(info["dtype"])
            at_dtype += end - start if width is None else (end - start) // width * dtype_bytes
    return on_disk, at_dtype


def proc_status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    from lrc.peak_memory import process_status_bytes

    value = process_status_bytes(field)
    if value is None:
        raise KeyError(field)
    return value


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux: 5 -> /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def setup(args: argparse.Namespace) -> tuple[Any, Any]:
    """torch with the run's threads, and the run's device."""
    import torch

    torch.set_num_threads(args.threads)
    if args.compile:  # each model in a process compiles the same forward's code again (graphs per instance)
        torch._dynamo.config.recompile_limit = 64
    import lrc  # noqa: F401  (registers the lrc loader with transformers)

    return torch, torch.device(args.device)


def load(folder: Path, args: argparse.Namespace) -> Any:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    if args.compile:  # one graph per shape class (prefill, decode), the sequence length symbolic
        model.forward = torch.compile(model.forward, fullgraph=True, dynamic=True)
    return model


def prompt(folder: Path, args: argparse.Namespace) -> Any:
    """The first seq_len tokens of the evaluation text, as the model's tokenizer splits them."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(Path(args.text).read_text()[:200000], return_tensors="pt").input_ids[:, : args.seq_len]
    assert ids.shape[1] == args.seq_len, "not enough evaluation text for the prefill"
    return ids.to(args.device)


def timed_run(model: Any, ids: Any, args: argparse.Namespace) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s): one forward of `ids`, then args.decode greedy steps with the KV
    cache, decode speed one over the median step time (a stall within the run does not count)."""
    import torch

    def now() -> float:  # on a GPU, after the queued work
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        return time.perf_counter()

    last_only = {} if args.all_logits else {"logits_to_keep": 1}  # generate()'s prefill: the last position's logits
    with torch.inference_mode():
        t0 = now()
        out = model(ids, use_cache=True, **last_only)
        t1 = now()
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        steps = []
        for _ in range(args.decode):
            t2 = now()
            step = model(token, past_key_values=cache, use_cache=True)
            cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
            steps.append(now() - t2)
    return args.seq_len / (t1 - t0), 1.0 / statistics.median(steps)


def warm_up(model: Any, ids: Any, args: argparse.Namespace) -> None:
    """First-use work (kernels, caches; with --compile, compiling the prefill and decode graphs) out of the
    timings and of the peak memory."""
    import torch

    if args.compile:
        timed_run(model, ids, args)
        return
    with torch.inference_mode():
        model(ids[:, :16], use_cache=True)


def child(args: argparse.Namespace) -> None:
    """One model in this process: load, measure memory (and speed alone), print one JSON line."""
    torch, device = setup(args)
    from lrc.peak_memory import held_tensor_bytes

    folder = Path(args.child)
    start = time.perf_counter()
    model = load(folder, args)
    load_s = time.perf_counter() - start
    ids = prompt(folder, args)
    gc.collect()
    held_after_load = held_tensor_bytes(model)
    rss_after_load = proc_status("VmRSS")
    warm_up(model, ids, args)
    gc.collect()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    speeds = [timed_run(model, ids, args)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status("VmHWM")
    speeds += [timed_run(model, ids, args) for _ in range(args.repeats - 1)]
    print(json.dumps({
        "load_s": load_s,
        "tensors_after_load": held_after_load,
        "tensors_after_run": held_tensor_bytes(model),
        "rss_after_load": rss_after_load,
        "peak_rss": peak,
        "prefill_tok_s": max(s[0] for s in speeds),
        "decode_tok_s": max(s[1] for s in speeds),
    }))


def alternating_child(args: argparse.Namespace) -> None:
    """Every model in this process, run in turn (the order rotated each round) for args.alternations rounds:
    the speeds of one round are seconds apart, so their ratios hold while the machine's speed drifts.
    Prints one JSON line {model: {"prefill_tok_s": [per round], "decode_tok_s": [per round]}}."""
    setup(args)
    models = dict(pair.split("=", 1) for pair in args.alternate)
    loaded = {name: load(Path(folder), args) for name, folder in models.items()}
    ids = prompt(Path(models["dense"]), args)
    for model in loaded.values():
        warm_up(model, ids, args)
    speeds: dict[str, dict[str, list[float]]] = {name: {"prefill_tok_s": [], "decode_tok_s": []} for name in loaded}
    names = list(loaded)
    for rnd in range(args.alternations):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            prefill, decode = timed_run(loaded[name], ids, args)
            speeds[name]["prefill_tok_s"].append(prefill)
            speeds[name]["decode_tok_s"].append(decode)
    print(json.dumps(speeds))


def child_json(script: str, arguments: list[str], threads: int, what: str, env: dict[str, str] | None = None) -> Any:
    """Run a bench script as a child process (this checkout's lrc, `threads` OpenMP threads, `env` added):
    its last stdout line as JSON; exits with its error output, named `what`, if it fails."""
    environment = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)} | (env or {})
    done = subprocess.run([sys.executable, script, *arguments], env=environment, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(extra: list[str], dtype: str, args: argparse.Namespace) -> Any:
    """A child process of this script (one dtype), its last stdout line as JSON."""
    arguments = [*extra, "--dtypes", dtype, "--threads", str(args.threads),
                 "--seq-len", str(args.seq_len), "--decode", str(args.decode), "--repeats", str(args.repeats),
                 "--alternations", str(args.alternations), "--device", args.device, "--text", str(args.text),
                 *(["--all-logits"] if args.all_logits else []), *(["--compile"] if args.compile else [])]
    return child_json(__file__, arguments, args.threads, f"{' '.join(extra)} ({dtype})")


def default_models() -> dict[str, Path]:
    from lrc.sources import local_folder, resolve_model

    return {
        "dense": local_folder(resolve_model("smollm2-135m")),
        "default recipe, 0.3": ROOT.parent / "out" / "smol-default-0.3",
        "loss-aware, 0.3": ROOT.parent / "out" / "smol-lossaware-0.3",
    }


def span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    if format(lo, fmt) == format(hi, fmt):
        return format(lo, fmt)
    return f"{format(lo, fmt)}{' to ' if lo < 0 else '-'}{format(hi, fmt)}"


def table(rows: list[dict[str, Any]], models: list[str], dtypes: list[str],
          alternations: dict[str, Any] | None = None) -> list[str]:
    """The markdown table. Speeds, from the alternating process where there is one (else from the per-model
    processes, a round being one process per model): each model's median run, then against dense the
    median of the ratios within each round (the models of a round ran seconds apart: the figure to read),
    the ratio of the fastest runs, and the range of the ratios within rounds. The fastest-run ratio alone
    misled on this VM: dense bfloat16 prefill ranged 1181-2409 tokens/s within one run, and one fast burst
    for one model moved it by a third."""
    lines = ["| model | dtype | file MiB | tensors MiB (x file) | peak RSS MiB (x dense) | dense - RSS, share of file saving "
             "| prefill tok/s (x dense: median per round; fastest; range) | decode tok/s (x dense: median per round; "
             "fastest; range) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for dtype in dtypes:
        for name in models:
            mine = [r for r in rows if r["model"] == name and r["dtype"] == dtype]
            dense = {r["round"]: r for r in rows if r["model"] == "dense" and r["dtype"] == dtype}
            file = mine[0]["file_bytes"] / MIB
            held = [r["tensors_after_run"] / r["file_bytes"] for r in mine]
            rss = [r["peak_rss"] / MIB for r in mine]
            rss_x = [r["peak_rss"] / dense[r["round"]]["peak_rss"] for r in mine]
            saving = [(dense[r["round"]]["peak_rss"] - r["peak_rss"]) / (dense[r["round"]]["file_bytes"] - r["file_bytes"])
                      for r in mine if name != "dense"]
            speeds = []
            for key, fmt in (("prefill_tok_s", ".0f"), ("decode_tok_s", ".1f")):
                if alternations and dtype in alternations:
                    series, dense_series = alternations[dtype][name][key], alternations[dtype]["dense"][key]
                else:
                    series = [r[key] for r in mine]
                    dense_series = [dense[r["round"]][key] for r in mine]
                best, best_dense = max(series), max(dense_series)
                per_round = [mine_s / dense_s for mine_s, dense_s in zip(series, dense_series)]
                speeds.append(f"{statistics.median(series):{fmt}} (**{statistics.median(per_round):.2f}**; "
                              f"{best / best_dense:.2f}; {span(per_round, '.2f')})")
            lines.append(
                f"| {name} | {dtype} | {file:.0f} | {span([r['tensors_after_run'] / MIB for r in mine], '.0f')} "
                f"({span(held, '.3f')}) | {span(rss, '.0f')} ({span(rss_x, '.2f')}) | "
                f"{span(saving, '.0%') if saving else '-'} | {speeds[0]} | {speeds[1]} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="NAME=FOLDER ...; the first is the dense baseline (named dense)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--alternations", type=int, default=12, help="rounds of the process that runs every "
                        "model in turn, for the speed columns (0: speeds from the per-model processes)")
    parser.add_argument("--out", default="bench/results/runtime")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on cuda the peak column is torch's peak "
                        "allocated device memory)")
    parser.add_argument("--text", default=str(WIKI_TEST), help="text whose first tokens are the prefill")
    parser.add_argument("--all-logits", action="store_true", help="prefill computes the logits of every "
                        "position (as a perplexity evaluation does), not only the last one's (as generate() does)")
    parser.add_argument("--compile", action="store_true", help="run each model's forward compiled "
                        "(torch.compile(model.forward, fullgraph=True, dynamic=True); compiled in the warm-up)")
    parser.add_argument("--rows", help="the .yaml of an earlier run: write its table again, measure nothing")
    parser.set_defaults(measured_on=None, measured_by=None)  # with --rows: the saved run's machine and command
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--alternate", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.alternate:
        args.dtype = args.dtypes[0]
        return child(args) if args.child else alternating_child(args)
    if args.rows:
        import yaml

        saved = yaml.safe_load(Path(args.rows).read_text())
        rows = saved["rows"]
        args.compile = saved.get("compile", False)
        for key in ("threads", "seq_len", "decode", "repeats", "device"):
            setattr(args, key, saved.get(key, getattr(args, key)))
        args.all_logits = saved.get("all_logits", True)  # runs before the option computed every position's logits
        args.rounds = 1 + max(r["round"] for r in rows)
        args.dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
        alternations = saved.get("alternations") or {}
        args.alternations = len(next(iter(alternations.values()))["dense"]["prefill_tok_s"]) if alternations else 0
        args.measured_on = saved.get("measured_on")  # older files: this machine's name, which may not be theirs
        args.measured_by = saved.get("measured_by", saved["command"])
        return write_table(args, rows, list(dict.fromkeys(r["model"] for r in rows)), alternations)
    if args.models:
        pairs = [m.split("=", 1) for m in args.models]
        models = {("dense" if i == 0 else name): Path(folder) for i, (name, folder) in enumerate(pairs)}
    else:
        models = default_models()
    for name, folder in models.items():
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{name}: no model at {folder} (for the defaults: lrc compress smollm2-135m --budget 0.3 "
                             "--calib wiki.valid.tokens [--method loss-aware] -o FOLDER)")
    rows = []
    alternations: dict[str, Any] = {}
    for dtype in args.dtypes:
        width = 4 if dtype == "float32" else 2
        for rnd in range(args.rounds):
            for name, folder in models.items():
                result = run_child(["--child", str(folder)], dtype, args)
                on_disk, at_dtype = file_bytes(folder, width)
                rows.append({"model": name, "dtype": dtype, "round": rnd, "folder": str(folder),
                             "file_bytes_on_disk": on_disk, "file_bytes": at_dtype, **result})
                print(json.dumps(rows[-1]), flush=True)
        if args.alternations:
            pairs = [f"{name}={folder}" for name, folder in models.items()]
            alternations[dtype] = run_child(["--alternate", *pairs], dtype, args)
            print(json.dumps({"alternations": dtype, **alternations[dtype]}), flush=True)
    write_table(args, rows, list(models), alternations)


def write_table(args: argparse.Namespace, rows: list[dict[str, Any]], models: list[str],
                alternations: dict[str, Any]) -> None:
    measured_on = args.measured_on or device_name(args)
    speeds = (f"speeds: one process running every model in turn, {args.alternations} rounds (the order rotated), "
              f"so the models of a round ran seconds apart" if alternations else
              f"speeds: the per-model processes, the fastest of {args.repeats} runs each")
    compiled = ("; every model's forward compiled (torch.compile(model.forward, fullgraph=True, dynamic=True), "
                "the graphs built in the warm-up)" if args.compile else "")
    lines = [
        f"{', '.join(models)}: loaded with transformers after `import lrc`; memory: one process "
        f"per model and dtype, {args.rounds} rounds (ranges shown); {speeds}; {measured_on}; "
        f"prefill = 1 x {args.seq_len} tokens "
        f"({'logits of every position' if args.all_logits else 'logits of the last position, as generate() computes'}), decode = {args.decode} greedy steps after "
        f"it (one over the median step){compiled}. file: safetensors bytes at that dtype; tensors: bytes held by the "
        f"model's tensors after the run; peak RSS: the process during prefill and decode (on a GPU: the peak of "
        f"torch's allocated device memory); 'dense - RSS' is the "
        f"peak-memory saving against dense as a share of the file-size saving.", "",
        *table(rows, models, args.dtypes, alternations),
    ]
    from results_files import write_results

    write_results(args.out, lines, {"threads": args.threads, "seq_len": args.seq_len, "decode": args.decode,
                                    "repeats": args.repeats, "device": args.device, "all_logits": args.all_logits,
                                    "compile": args.compile, "measured_on": measured_on,
                                    **({"measured_by": args.measured_by} if args.measured_by else {}),
                                    "rows": rows,
                                    "alternations": alternations})


def device_name(args: argparse.Namespace) -> str:
    """This machine as the table names it: the device, the thread count (CPU) and torch's version."""
    import torch
    from results_files import cpu_description

    if args.device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (cuda), torch {torch.__version__}"
    return f"{cpu_description()}, {args.threads} threads, torch {torch.__version__}"


if __name__ == "__main__":
    main()
