"""Helpers of bench/gpu_check.sh: build the model and text it compresses, and compare the cuda and cpu runs.

    python bench/gpu_check.py build DIR [--layers 30] [--widths llama3-8b]   # DIR/model (random), DIR/calib.txt
    python bench/gpu_check.py compare CUDA_OUT CPU_OUT OUT.md [--log LOG]

Nothing here reads a file outside the checkout or the network: the tokenizer is byte-level (256 bytes +
2 specials), the text is generated (tests/conftest.py synthetic_text).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=256, eos_token_id=257)


def build(folder: Path, layers: int, chars: int, widths: str = "smollm2-135m") -> None:
    """A llama with SmolLM2-135M's shapes, or another model's layer widths (bench/scale.py's SHAPES) with a
    4096-token vocabulary (the byte tokenizer uses 258 ids) written in bfloat16; random weights, `layers`
    blocks, a byte tokenizer and a text."""
    from scale import SHAPES
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import byte_tokenizer, synthetic_text

    config = SMOLLM2_135M | {"num_hidden_layers": layers}
    if widths != "smollm2-135m":
        hidden, mlp, heads, kv, _ = SHAPES[widths]
        config |= dict(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads, num_key_value_heads=kv,
                       vocab_size=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    if widths != "smollm2-135m":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder / "model")
    byte_tokenizer().save_pretrained(folder / "model")
    (folder / "calib.txt").write_text(synthetic_text(chars), encoding="utf-8")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def compare(cuda_out: Path, cpu_out: Path, md: Path, log: Path | None) -> None:
    """Times, held-out losses, allocations and tensors of the two runs, as a markdown table."""
    from safetensors.torch import load_file

    reports = {name: yaml.safe_load((folder / "lrc_report.yaml").read_text()) for name, folder in
               (("cuda", cuda_out), ("cpu", cpu_out))}
    lines = [f"# {reports['cuda']['environment']['device']} against {reports['cpu']['environment']['device']}", ""]
    if log is not None and log.is_file():
        lines += ["```", log.read_text().strip(), "```", ""]
    lines += ["| phase | device s | cpu s | cpu / device |", "| --- | --- | --- | --- |"]
    for key in reports["cpu"]["timing_s"]:
        c, g = reports["cpu"]["timing_s"][key], reports["cuda"]["timing_s"].get(key)
        ratio = f"{c / g:.1f}x" if g else "-"
        lines.append(f"| {key} | {g} | {c} | {ratio} |")
    held = {k: r.get("held_out", {}) for k, r in reports.items()}
    lines += ["", "| held-out | device | cpu | relative difference |", "| --- | --- | --- | --- |"]
    for key in ("dense_perplexity", "compressed_perplexity", "perplexity_ratio"):
        g, c = held["cuda"].get(key), held["cpu"].get(key)
        diff = f"{abs(g - c) / abs(c):.2e}" if isinstance(g, (int, float)) and isinstance(c, (int, float)) and c else "-"
        lines.append(f"| {key} | {g} | {c} | {diff} |")
    a, b = load_file(str(cuda_out / "model.safetensors")), load_file(str(cpu_out / "model.safetensors"))
    same_shape = [k for k in b if k in a and a[k].shape == b[k].shape]
    diffs = sorted(((relative(a[k], b[k]), k) for k in same_shape), reverse=True)
    lines += ["", f"Tensors: {len(b)} in the cpu output, {len(a)} in the device output, {len(same_shape)} with the same "
              f"name and shape; {len(set(a) ^ set(b))} names in one only (a different rank or form chosen).", ""]
    if diffs:
        values = [d for d, _ in diffs]
        lines += [f"Relative difference ||device - cpu|| / ||cpu|| over same-shaped tensors: max {values[0]:.2e} "
                  f"({diffs[0][1]}), median {values[len(values) // 2]:.2e} (factors are free up to signs and the order "
                  "of atoms: the layers' products below are what must agree).", ""]
    on_device, on_cpu = dense_weights(cuda_out), dense_weights(cpu_out)
    products = sorted(((relative(w, on_cpu[k]), k) for k, w in on_device.items() if k in on_cpu), reverse=True)
    if products:
        values = [d for d, _ in products]
        lines += [f"Layer products W = the factors multiplied out, ||W_device - W_cpu|| / ||W_cpu|| over {len(values)} "
                  f"compressed layers: max {values[0]:.2e} ({products[0][1]}), median {values[len(values) // 2]:.2e}.", ""]
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"max_relative_difference": products[0][0] if products else None}))


def dense_weights(folder: Path) -> dict[str, torch.Tensor]:
    """{layer name: its weight multiplied out (out x in)} for every compressed layer of the lrc output `folder`."""
    import lrc

    model = lrc.load(str(folder), need_tokenizer=False).model
    with torch.no_grad():
        return {name: module.dense_weight().float().cpu() for name, module in model.named_modules()
                if callable(getattr(module, "dense_weight", None))}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("folder", type=Path)
    b.add_argument("--layers", type=int, default=30)
    b.add_argument("--chars", type=int, default=400_000)
    b.add_argument("--widths", default="smollm2-135m", help="a name in bench/scale.py's SHAPES")
    c = sub.add_parser("compare")
    c.add_argument("cuda_out", type=Path)
    c.add_argument("cpu_out", type=Path)
    c.add_argument("md", type=Path)
    c.add_argument("--log", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        build(args.folder, args.layers, args.chars, args.widths)
    else:
        compare(args.cuda_out, args.cpu_out, args.md, args.log)


if __name__ == "__main__":
    main()
