"""What one compressed projection costs against its dense layer, at a model's real widths, on a device.

For the projections of one decoder layer of a model shape (Llama-3-8B: q/o 4096 x 4096, k/v 1024 x 4096,
gate/up 14336 x 4096, down 4096 x 14336), random weights, times y = layer(x) for a decode step (1 token) and a
prefill (512 tokens) in three forms holding the same share `--keep` of the dense layer's weight bytes:
- dense: nn.Linear (the baseline);
- low rank (lrc's LowRankLinear): rank r = keep · out · in / (out + in);
- sparse dictionary (lrc's SparseDictionaryLinear): half of the out x k mixing entries stored (bitmask layout,
  1/8 byte per entry) and k atoms such that it too holds `keep` of the dense bytes (at bfloat16),
  k = keep · out · in / (in + (1/2 + 1/16) · out); on SmolLM2-135M's gate / up (1536 x 576) that is 430 atoms,
  where the default recipe at budget 0.3 chose 413-418 atoms with half the mixing stored;
- sparse dictionary 2:4 (CUDA only): the same atoms and bytes with the mixing in the 2:4 pattern
  (`method_options: {pattern: "2:4"}`), held as torch's semi-structured sparse tensor, whose kernels
  (cuSPARSELt or CUTLASS) multiply it; atom counts rounded to a multiple of 64 (their shape rule). On a CPU
  torch has no such kernels: the form is left out and the table says so.
Each form's time is the median over `--rounds` rounds (forms in rotated order within a round, seconds apart) of
the mean of `--calls` back-to-back calls; on CUDA timed after a synchronize. The decoder-layer row sums the
seven projections. Attention, norms and the head are not here: bench/runtime.py measures whole models.

    python bench/layer_speed.py --device cuda --dtype bfloat16   # bench/results/layer_speed/layer_speed_cuda_llama3-8b.md
    python bench/layer_speed.py --device cpu --shape test-tiny --out /tmp/ls   # a dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scale import SHAPES  # noqa: E402  (bench/scale.py: name -> hidden, MLP, heads, KV heads, layers)

from lrc.factorize.sparse_dictionary import group_top_mask  # noqa: E402
from lrc.forms.lowrank import LowRankLinear  # noqa: E402
from lrc.forms.sparse_linear import SparseDictionaryLinear  # noqa: E402

SEMI_STRUCTURED = "sparse dictionary 2:4"
LEFT_OUT: dict[str, str] = {}  # form -> why it was not measured

MIXING_DENSITY = 0.5


def projections(hidden: int, mlp: int, heads: int, kv: int, *_: int) -> dict[str, tuple[int, int]]:
    """name: (out, in) of one decoder layer's projections."""
    kv_width = hidden // heads * kv
    return {"q": (hidden, hidden), "k": (kv_width, hidden), "v": (kv_width, hidden), "o": (hidden, hidden),
            "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}


def aligned(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


class SemiStructuredDictionary(nn.Module):
    """y = (x Uᵀ) Sᵀ: atoms U (k x in) dense, mixing S (out x k) 2:4 as torch's semi-structured sparse tensor."""

    def __init__(self, mixing: torch.Tensor, atoms: torch.Tensor) -> None:
        super().__init__()
        self.atoms = nn.Parameter(atoms, requires_grad=False)
        self.mixing = nn.Parameter(torch.sparse.to_sparse_semi_structured(mixing), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.atoms), self.mixing)


def forms(out: int, inp: int, keep: float, align: int, wanted: list[str], device: torch.device, dtype: torch.dtype,
          gen: torch.Generator) -> dict[str, nn.Module]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).div_(shape[-1] ** 0.5)

    def dense() -> nn.Module:
        layer = nn.Linear(inp, out, bias=False)
        layer.weight.data = randn(out, inp)
        return layer

    def low_rank() -> nn.Module:
        rank = aligned(keep * out * inp / (out + inp), align)
        return LowRankLinear.from_factors(randn(out, rank), randn(rank, inp))

    def sparse() -> nn.Module:
        atoms = aligned(keep * out * inp / (inp + (MIXING_DENSITY + 1 / 16) * out), align)
        mixing = randn(out, atoms) * (torch.rand(out, atoms, generator=gen) < MIXING_DENSITY)
        return SparseDictionaryLinear.from_factors(mixing, randn(atoms, inp), layout="bitmask")

    def semi_structured() -> nn.Module:
        atoms = aligned(keep * out * inp / (inp + (MIXING_DENSITY + 1 / 16) * out), 64)
        mixing = randn(out, atoms) * group_top_mask(torch.rand(out, atoms, generator=gen), 2, 4)
        return SemiStructuredDictionary(mixing.to(device=device, dtype=dtype), randn(atoms, inp).to(device=device, dtype=dtype))

    builders = {"dense": dense, "low rank": low_rank, "sparse dictionary": sparse, SEMI_STRUCTURED: semi_structured}
    if device.type != "cuda" and SEMI_STRUCTURED in wanted:
        LEFT_OUT.setdefault(SEMI_STRUCTURED, "torch's semi-structured sparse kernels run on CUDA only")
    made = {}
    for name in [n for n in builders if n in wanted and n not in LEFT_OUT]:
        try:
            layer = builders[name]()
            if name != SEMI_STRUCTURED:  # that one is made on the device, in the dtype: its tensor may not move
                layer = layer.to(device=device, dtype=dtype)
            made[name] = layer.eval()
        except (RuntimeError, NotImplementedError) as error:  # torch's semi-structured tensor on this GPU
            if name != SEMI_STRUCTURED:
                raise
            LEFT_OUT[name] = why(error)
    return made


def why(error: Exception) -> str:
    """An error's type and first line, for the table's note on a form left out."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def weight_bytes(layer: nn.Module) -> int:
    """Bytes held: a semi-structured tensor's stored values and metadata, not its dense shape."""
    total = 0
    semi = torch.sparse.SparseSemiStructuredTensor
    for t in [*layer.parameters(), *layer.buffers()]:
        data = t if isinstance(t, semi) else t.data
        if isinstance(data, semi):
            parts = [data.packed, data.meta, data.packed_t, data.meta_t, data.compressed_swizzled_bitmask]
            total += sum(part.numel() * part.element_size() for part in parts if part is not None)
        else:
            total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def call_seconds(layer: nn.Module, x: torch.Tensor, calls: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    for _ in range(calls):
        layer(x)
    sync()
    return (time.perf_counter() - start) / calls


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (out, inp) in projections(*SHAPES[args.shape]).items():
        layers = forms(out, inp, args.keep, args.align, args.forms, device, dtype, gen)
        for tokens in args.tokens:
            x = torch.randn(tokens, inp, generator=gen).to(device=device, dtype=dtype)
            for form, layer in list(layers.items()):  # warm-up: kernels chosen, caches built
                try:
                    call_seconds(layer, x, 3, device)
                except (RuntimeError, NotImplementedError) as error:
                    if form != SEMI_STRUCTURED:
                        raise
                    LEFT_OUT[form] = f"{tokens} tokens: {why(error)}"
                    del layers[form]
            times: dict[str, list[float]] = {form: [] for form in layers}
            order = list(layers)
            for r in range(args.rounds):
                for form in order[r % len(order):] + order[:r % len(order)]:
                    times[form].append(call_seconds(layers[form], x, args.calls, device))
            for form, layer in layers.items():
                rows.append({"projection": name, "shape": f"{out} x {inp}", "tokens": tokens, "form": form,
                             "bytes": weight_bytes(layer), "seconds": statistics.median(times[form])})
    return rows


def table(rows: list[dict[str, object]], args: argparse.Namespace, device_name: str) -> list[str]:
    lines = [f"# One decoder layer's projections, {args.shape} widths, {args.dtype} on {device_name}", "",
             f"Random weights; every form holds {args.keep} of dense's bytes at bfloat16 (sparse dictionary: "
             f"{MIXING_DENSITY} of the mixing stored, bitmask layout), ranks and atom counts rounded to a multiple of "
             f"{args.align}. Times: median over {args.rounds} rounds "
             f"of the mean of {args.calls} calls; x dense = dense time / form time (above 1: faster). "
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads.", "",
             "| projection | out x in | form | bytes x dense | " + " | ".join(f"{t} tok: µs (x dense)" for t in args.tokens) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in args.tokens) + " |"]
    notes = [f"{form}: not measured or not at every size ({why})." for form, why in LEFT_OUT.items()]
    lines[4:4] = [*notes, ""] if notes else []
    key = {(r["projection"], r["tokens"], r["form"]): r for r in rows}
    names = list(dict.fromkeys(str(r["projection"]) for r in rows))
    forms_ = list(dict.fromkeys(str(r["form"]) for r in rows))
    for name in [*names, "decoder layer"]:
        for form in forms_:
            picked = [r for r in rows if r["form"] == form and (name == "decoder layer" or r["projection"] == name)]
            dense = [r for r in rows if r["form"] == "dense" and (name == "decoder layer" or r["projection"] == name)]
            ratio_bytes = sum(int(r["bytes"]) for r in picked if r["tokens"] == args.tokens[0]) / sum(
                int(r["bytes"]) for r in dense if r["tokens"] == args.tokens[0])
            cells = []
            for t in args.tokens:
                s = sum(float(r["seconds"]) for r in picked if r["tokens"] == t)
                d = sum(float(r["seconds"]) for r in dense if r["tokens"] == t)
                cells.append(f"{s * 1e6:.1f} ({d / s:.2f})")
            shape = "all seven" if name == "decoder layer" else key[(name, args.tokens[0], form)]["shape"]
            label = f"**{name}**" if name == "decoder layer" else name
            lines.append(f"| {label} | {shape} | {form} | {ratio_bytes:.2f} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    parser.add_argument("--keep", type=float, default=0.7, help="low rank's share of the dense bytes")
    parser.add_argument("--align", type=int, default=8,
                        help="round ranks and atom counts to a multiple of this (8: the knapsack's rank step)")
    parser.add_argument("--forms", nargs="+", default=["dense", "low rank", "sparse dictionary", SEMI_STRUCTURED])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=None,
                        help="path without suffix (default bench/results/layer_speed/layer_speed_DEVICE_SHAPE)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = table(measure(args), args, name)
    print("\n".join(lines))
    out = Path(args.out or f"bench/results/layer_speed/layer_speed_{device.type}_{args.shape}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
