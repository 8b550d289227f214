"""Peak resident memory and wall time of converting a .gguf file into lrc's safetensors cache: tensor by tensor
(what lrc does) against the whole-model conversion (transformers loads the model, `write_checkpoint` writes it).

Each conversion runs `lrc.sources.gguf_folder` in its own subprocess with `LRC_CACHE_DIR` pointed at a fresh
temporary folder; the peak is that process's peak resident set size (VmHWM in /proc/self/status: getrusage
ru_maxrss would report at least the launching process's own peak, which Linux carries over fork and exec), the
time its wall clock around the call. A
third subprocess only imports what a conversion imports (torch, transformers, gguf, lrc, the model class), for the
floor both peaks stand on. `--before DIR` also measures the conversion of an lrc source tree from before the streamed
conversion (e.g. `git archive 4903cdb | tar -x -C DIR`). Every folder must hold the same files with the same bytes.

    python bench/gguf_convert.py --before DIR    # the built-in SmolLM2-135M GGUF (Q4_1); writes bench/results/gguf_convert.md/.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from math import prod
from pathlib import Path

from results_files import write_results

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2

CHILD = r"""
import json, sys, time
from pathlib import Path
import gguf, torch, transformers
from lrc.sources import gguf_folder
mode, path, model_class = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
getattr(transformers, model_class)  # imports the model's module, as both conversions do
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss would carry the launcher's over the exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
before_tensors = []
def progress(phase, done, total):
    if done == 0 and not before_tensors:
        before_tensors.append(peak())
start = time.perf_counter()
if mode != "imports":
    if mode == "whole":
        import lrc.io.gguf as converter
        converter.whole_model_reason = lambda architecture: "measured"
    folder = gguf_folder(path, progress)
seconds = time.perf_counter() - start
print(json.dumps({"peak_rss": peak(), "seconds": seconds, "peak_before_tensors": (before_tensors or [peak()])[0]}))
"""


def run(mode: str, gguf: Path, cache: Path, model_class: str, code: Path = ROOT) -> dict:
    """Measure one conversion (`mode`: imports | whole | streamed | before) with lrc's code from `code`."""
    env = {**os.environ, "LRC_CACHE_DIR": str(cache), "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(gguf), model_class], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} conversion failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gguf_model_class(gguf: Path) -> str:
    """The transformers causal-LM class name of the file's architecture (read in this process, not the measured ones)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]


def largest_tensor_bytes(cache: Path) -> int:
    from lrc.io.checkpoint import read_tensor_names

    (folder,) = (cache / "gguf").iterdir()
    sizes = [4 * prod(shape) for dtype, shape in read_tensor_names(folder).values() if dtype == "F32"]
    return max(sizes)


def folder_hashes(cache: Path) -> dict[str, str]:
    (folder,) = (cache / "gguf").iterdir()
    hashes = {}
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        hashes[path.name] = digest.hexdigest()
    return hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", help="the .gguf file (default: the smollm2-135m alias)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf_convert"))
    parser.add_argument("--before", type=Path, help="a checkout of lrc before the streamed conversion, measured too")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from lrc.sources import alias_path

    gguf = Path(args.gguf) if args.gguf else alias_path("smollm2-135m")
    model_class = gguf_model_class(gguf)
    results, hashes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("imports", "whole", "streamed") + (("before",) if args.before else ()):
            cache = Path(tmp) / mode
            results[mode] = run(mode, gguf, cache, model_class, args.before if mode == "before" else ROOT)
            if mode != "imports":
                hashes[mode] = folder_hashes(cache)
                weights = sum(p.stat().st_size for p in next((cache / "gguf").iterdir()).glob("*.safetensors"))
                results[mode]["safetensors_bytes"] = weights
                results[mode]["largest_tensor_bytes"] = largest_tensor_bytes(cache)
    same = all(h == hashes["streamed"] for h in hashes.values())
    imports = results["imports"]["peak_rss"]
    lines = [
        f"GGUF conversion of {gguf.name} ({gguf.stat().st_size / MIB:.0f} MiB file, "
        f"{results['streamed']['safetensors_bytes'] / MIB:.0f} MiB of float32 safetensors written, the largest "
        f"tensor {results['streamed']['largest_tensor_bytes'] / MIB:.0f} MiB)",
        "",
        "| conversion | peak RSS (MiB) | above the imports (MiB) | peak before the first tensor (MiB) | wall time (s) |",
        "|---|---:|---:|---:|---:|",
        f"| imports only | {imports / MIB:.0f} | 0 | | |",
    ]
    labels = {"before": f"lrc before the streamed conversion ({args.before})",
              "whole": "whole model (transformers load + write_checkpoint)", "streamed": "tensor by tensor (lrc)"}
    for mode, label in labels.items():
        if mode not in results:
            continue
        peak = results[mode]["peak_rss"]
        lines.append(f"| {label} | {peak / MIB:.0f} | {(peak - imports) / MIB:.0f} | "
                     f"{results[mode]['peak_before_tensors'] / MIB:.0f} | {results[mode]['seconds']:.1f} |")
    lines += ["", f"Same files, same bytes in every folder: {'yes' if same else 'NO'} ({len(hashes['streamed'])} files)."]
    write_results(args.out, lines, {"gguf": str(gguf), "results": results, "same_bytes": same,
                                    "files": hashes["streamed"]})
    if not same:
        raise SystemExit("the two conversions wrote different folders")


if __name__ == "__main__":
    main()
