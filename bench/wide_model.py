"""A dense model with wider layers than SmolLM2-135M's, for benches that need its widths but not its weights.

SmolLM2-135M's config (Llama architecture, its 49152-token tokenizer copied beside it) with the hidden and
MLP widths, head counts and layer count given; random weights (transformers' initialisation, seed 0),
float32 safetensors. What a bench measures on it is bytes and time, which depend on the shapes only:
compress it with a small calibration set and run bench/runtime.py on the folders. The defaults
(hidden 2048, MLP 8192, 32 heads of 64, 8 KV heads, 4 layers: 344M parameters, 1.3 GiB) are Llama-3.2-1B's
layer widths.

    python bench/wide_model.py --out ../out/wide/dense
    lrc compress ../out/wide/dense --budget 0.3 --calib ../shared/data/wikitext-2/wiki.valid.tokens \\
        --samples 32 --seq-len 256 -o ../out/wide/default
    python bench/runtime.py --rounds 2 --repeats 1 --alternations 6 --models dense=../out/wide/dense \\
        "default recipe, 0.3=../out/wide/default" ... --out bench/results/runtime_wide
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import torch
    import transformers

    from lrc.sources import local_folder, resolve_model

    source = local_folder(resolve_model("smollm2-135m"))
    config = transformers.AutoConfig.from_pretrained(source)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = args.hidden, args.mlp, args.layers
    config.num_attention_heads, config.num_key_value_heads = args.heads, args.kv_heads
    config.head_dim = args.hidden // args.heads
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(args.out)
    for file in source.iterdir():
        if file.name.startswith("tokenizer") or file.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(file, args.out / file.name)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
