"""Up to how many bfloat16 tokens lrc's dense C kernel beats torch's product on this CPU.

`lrc.forms.cpu_kernels.linear` runs lrc's kernel for a few bfloat16 tokens per call (decoding, a batch of
sequences decoded together, a speculative step's draft tokens) and torch's product above
`DENSE_KERNEL_MAX_TOKENS`. Where that cut lies depends on the CPU: torch's bfloat16 product goes through
oneDNN, on AMX where the CPU has it. This bench times both on SmolLM2-135M's factor shapes at budget 0.3
(gate/up down, their up, q's down and up, down's down), `--matrices` distinct matrices of each shape cycled
through (weights come from memory, as in decoding), the two alternating within each round; the table gives
torch's time over the kernel's (above 1: the kernel is faster), median over rounds.

Above the cut, on an x86 CPU without AMX, lrc converts x and W to float32 for the product: a second table
times torch's bfloat16 product against that, at 8 to 512 tokens.

With `--model OUT` it also times a whole bfloat16 forward of `--step-tokens` new tokens after a 512-token
prefill (the KV cache copied for each step) under lrc's choice, the kernel's cut at 4 and at 8 tokens, and
torch's bfloat16 product above the cut, the settings rotated each round.

    python bench/cpu_kernel_crossover.py                       # bench/results/cpu_kernel_crossover.md
    python bench/cpu_kernel_crossover.py --model OUT --step-tokens 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results_files import cpu_description, write_results  # noqa: E402

from lrc.forms import cpu_kernels  # noqa: E402

SHAPES = {"gate/up down 296x576": (296, 576), "gate up 1536x296": (1536, 296), "down down 296x1536": (296, 1536),
          "q down 200x576": (200, 576), "q up 576x200": (576, 200)}
TOKENS = (1, 2, 4, 6, 8, 12, 16, 24, 32)
FLOAT32_TOKENS = (8, 16, 32, 64, 128, 512)


def kernel_call(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """lrc's dense bfloat16 kernel, called directly at any token count: y (tokens x out) = x weightᵀ."""
    cpu_kernels.library().lrc_dense_mm(1, weight.data_ptr(), None, weight.shape[0], weight.shape[1],  # type: ignore[union-attr]
                                            x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())


def alternate(calls: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each call's time per round, the calls in a rotated order each round (a change in the machine's speed
    touches all of them alike)."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            times[name].append(calls[name]())
    return times


def per_matrix(call: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> Callable[[], float]:
    """A timed pass of `call` over every matrix (two warm-up calls first): seconds per matrix."""
    def timed() -> float:
        for w in weights[:2]:
            call(w)
        start = time.perf_counter()
        for w in weights:
            call(w)
        return (time.perf_counter() - start) / len(weights)
    return timed


def shape_table(args: argparse.Namespace, tokens_list: tuple[int, ...], other: str) -> list[str]:
    """torch's bfloat16 product's time over `other`'s ("kernel": lrc's C kernel, "float32": x and W converted
    to float32 for the call, the result rounded to bfloat16), per shape and token count, median over rounds."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (out, inp) in SHAPES.items():
        weights = [torch.randn(out, inp, generator=g).to(torch.bfloat16) for _ in range(args.matrices)]
        cells = []
        for tokens in tokens_list:
            x = torch.randn(tokens, inp, generator=g).to(torch.bfloat16)
            y = torch.empty(tokens, out, dtype=torch.bfloat16)
            ours = ((lambda w, x=x, y=y: kernel_call(w, x, y)) if other == "kernel"
                    else (lambda w, x=x: torch.nn.functional.linear(x.float(), w.float()).to(torch.bfloat16)))
            times = alternate({"torch": per_matrix(lambda w, x=x: torch.nn.functional.linear(x, w), weights),
                               other: per_matrix(ours, weights)}, args.rounds)
            cells.append(f"{statistics.median(times['torch']) / statistics.median(times[other]):.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return ["| shape (out x in) | " + " | ".join(f"{t} tok" for t in tokens_list) + " |",
            "| --- |" + " --- |" * len(tokens_list), *rows]


def whole_model(args: argparse.Namespace) -> list[str]:
    import transformers

    import lrc  # noqa: F401  (registers lrc's format with transformers)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, model.config.vocab_size, (1, 512), generator=g)
    new = torch.randint(100, model.config.vocab_size, (1, args.step_tokens), generator=g)
    cut, in_float32 = cpu_kernels.DENSE_KERNEL_MAX_TOKENS, cpu_kernels.BF16_PRODUCTS_IN_FLOAT32
    settings = {"lrc's choice": (cut, in_float32), "kernel up to 4": (4, in_float32), "kernel up to 8": (8, in_float32),
                "torch's bfloat16 above the cut": (cut, False)}
    with torch.inference_mode():
        cache = model(prompt, use_cache=True, logits_to_keep=1).past_key_values

        def step(setting: tuple[int, bool]) -> Callable[[], float]:
            def timed() -> float:
                cpu_kernels.DENSE_KERNEL_MAX_TOKENS, cpu_kernels.BF16_PRODUCTS_IN_FLOAT32 = setting
                best = []
                for _ in range(3):
                    own = copy.deepcopy(cache)
                    start = time.perf_counter()
                    model(new, past_key_values=own, use_cache=True)
                    best.append(time.perf_counter() - start)
                return min(best)
            return timed

        for setting in settings.values():  # first use of each path out of the timings
            step(setting)()
        times = alternate({name: step(setting) for name, setting in settings.items()}, args.rounds)
        cpu_kernels.DENSE_KERNEL_MAX_TOKENS, cpu_kernels.BF16_PRODUCTS_IN_FLOAT32 = cut, in_float32
    lines = ["", f"Whole model {args.model}, bfloat16, one forward of {args.step_tokens} tokens after a 512-token "
             f"prefill, fastest of 3 per round, {args.rounds} rounds, the settings rotated (here lrc runs its kernel up "
             f"to {cut} tokens{', float32 products above' if in_float32 else ''}):", "",
             "| setting | ms (median) | time / lrc's choice: median per round (range) |", "| --- | --- | --- |"]
    for name, values in times.items():
        ratios = [a / b for a, b in zip(values, times["lrc's choice"], strict=True)]
        lines.append(f"| {name} | {statistics.median(values) * 1e3:.1f} | {statistics.median(ratios):.2f} "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrices", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="an lrc output folder: also time whole multi-token steps")
    parser.add_argument("--step-tokens", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_kernel_crossover"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels.library() is None:
        sys.exit("lrc's CPU kernels could not be compiled here")
    lines = [f"# torch's bfloat16 product over lrc's dense kernel, time ratio ({cpu_description()}, {args.threads} threads, "
             f"torch {torch.__version__}; lrc runs its kernel up to {cpu_kernels.DENSE_KERNEL_MAX_TOKENS} tokens here)", "",
             f"{args.matrices} matrices per shape cycled through, {args.rounds} rounds alternating the two; "
             "above 1: lrc's kernel is faster.", "", *shape_table(args, TOKENS, "kernel"), "",
             "torch's bfloat16 product over the same product in float32 (x and W converted for the call, the result "
             "rounded to bfloat16); above 1: float32 is faster.", "", *shape_table(args, FLOAT32_TOKENS, "float32")]
    if args.model:
        lines += whole_model(args)
    write_results(args.out, lines, {"threads": args.threads, "matrices": args.matrices, "rounds": args.rounds,
                                    "model": args.model, "step_tokens": args.step_tokens})


if __name__ == "__main__":
    main()
