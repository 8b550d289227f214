"""Up to how many bfloat16 tokens lrc's dense C kernel beats torch's product on this CPU.

`lrc.forms.cpu_kernels.linear` runs lrc's kernel for a few bfloat16 tokens per call (decoding, a batch of
sequences decoded together, a speculative step's draft tokens) and torch's product above
`DENSE_KERNEL_MAX_TOKENS`. Where that cut lies depends on the CPU: torch's bfloat16 product goes through
oneDNN, on AMX where the CPU has it. This bench times both on SmolLM2-135M's factor shapes at budget 0.3
(gate/up down, their up, q's down and up, down's down), `--matrices` distinct matrices of each shape cycled
through (weights come from memory, as in decoding), the two alternating within each round; the table gives
torch's time over the kernel's (above 1: the kernel is faster), median over rounds.

With `--model OUT` it also times a whole bfloat16 forward of `--step-tokens` new tokens after a 512-token
prefill (the KV cache copied for each step) with the kernel's cut at 4 tokens and at 8, alternating.

    python bench/cpu_kernel_crossover.py                       # bench/results/cpu_kernel_crossover.md
    python bench/cpu_kernel_crossover.py --model OUT --step-tokens 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results_files import cpu_description, write_results  # noqa: E402

from lrc.forms import cpu_kernels  # noqa: E402

SHAPES = {"gate/up down 296x576": (296, 576), "gate up 1536x296": (1536, 296), "down down 296x1536": (296, 1536),
          "q down 200x576": (200, 576), "q up 576x200": (576, 200)}
TOKENS = (1, 2, 4, 6, 8, 12, 16, 24, 32)


def kernel_call(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """lrc's dense bfloat16 kernel, called directly at any token count: y (tokens x out) = x weightᵀ."""
    cpu_kernels.library().lrc_dense_mm_bf16(weight.data_ptr(), None, weight.shape[0], weight.shape[1],  # type: ignore[union-attr]
                                            x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())


def crossover(args: argparse.Namespace) -> list[str]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (out, inp) in SHAPES.items():
        weights = [torch.randn(out, inp, generator=g).to(torch.bfloat16) for _ in range(args.matrices)]
        cells = []
        for tokens in TOKENS:
            x = torch.randn(tokens, inp, generator=g).to(torch.bfloat16)
            y = torch.empty(tokens, out, dtype=torch.bfloat16)
            calls = {"torch": lambda w, x=x: torch.nn.functional.linear(x, w), "kernel": lambda w, x=x, y=y: kernel_call(w, x, y)}
            times: dict[str, list[float]] = {"torch": [], "kernel": []}
            for round_ in range(args.rounds):
                for key in (("torch", "kernel") if round_ % 2 else ("kernel", "torch")):
                    for w in weights[:2]:
                        calls[key](w)
                    start = time.perf_counter()
                    for w in weights:
                        calls[key](w)
                    times[key].append((time.perf_counter() - start) / len(weights))
            cells.append(f"{statistics.median(times['torch']) / statistics.median(times['kernel']):.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return ["| shape (out x in) | " + " | ".join(f"{t} tok" for t in TOKENS) + " |",
            "| --- |" + " --- |" * len(TOKENS), *rows]


def whole_model(args: argparse.Namespace) -> list[str]:
    import transformers

    import lrc  # noqa: F401  (registers lrc's format with transformers)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, model.config.vocab_size, (1, 512), generator=g)
    new = torch.randint(100, model.config.vocab_size, (1, args.step_tokens), generator=g)
    times: dict[int, list[float]] = {4: [], 8: []}
    with torch.inference_mode():
        cache = model(prompt, use_cache=True, logits_to_keep=1).past_key_values

        def step() -> float:
            own = copy.deepcopy(cache)
            start = time.perf_counter()
            model(new, past_key_values=own, use_cache=True)
            return time.perf_counter() - start

        default = cpu_kernels.DENSE_KERNEL_MAX_TOKENS
        for round_ in range(args.rounds):
            for cut in ((4, 8) if round_ % 2 else (8, 4)):
                cpu_kernels.DENSE_KERNEL_MAX_TOKENS = cut
                times[cut].append(min(step() for _ in range(3)))
        cpu_kernels.DENSE_KERNEL_MAX_TOKENS = default
    ratios = [a / b for a, b in zip(times[4], times[8])]
    return ["", f"Whole model {args.model}, bfloat16, one forward of {args.step_tokens} tokens after a 512-token "
            f"prefill, fastest of 3 per round, {args.rounds} rounds: kernel up to 4 tokens "
            f"{statistics.median(times[4]) * 1e3:.1f} ms, up to 8 {statistics.median(times[8]) * 1e3:.1f} ms; "
            f"time(4) / time(8), median of per-round ratios {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f})."]


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
             "above 1: lrc's kernel is faster.", "", *crossover(args)]
    if args.model:
        lines += whole_model(args)
    write_results(args.out, lines, {"threads": args.threads, "matrices": args.matrices, "rounds": args.rounds,
                                    "model": args.model, "step_tokens": args.step_tokens})


if __name__ == "__main__":
    main()
