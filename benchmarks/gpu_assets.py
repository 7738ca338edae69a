"""The offline assets the GPU tier of benchmarks/paper.py needs, small enough to carry to the device.

The device machine reaches no registry and a call carries at most 64 MiB, so this writes, into
``.gpu_assets/`` (git-ignored; carry it):

* ``all-MiniLM-L6-v2-fp16/``: the all-MiniLM-L6-v2 encoder of ``make assets`` with its weights
  stored in float16 (45 MB instead of 91 MB; pf2lora loads any model in float32, so only the
  weights' rounding differs: the largest ||fp16 - fp32|| / ||fp32|| over tensors is recorded in
  ``.gpu_assets/assets.json``), its config and tokenizer files unchanged;
* ``cache/``: the Rotten Tomatoes and VADER data of pf2lora's cache (point ``PF2LORA_CACHE`` at it).

    python benchmarks/gpu_assets.py          # then: carry .gpu_assets (see benchmarks/gpu_paper.sh)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pf2lora.io import cache_dir
from pf2lora.models import l6_dir

OUT = ROOT / ".gpu_assets"
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
DATA = ("rotten_tomatoes", "vader")


def main() -> int:
    src = l6_dir()
    model = OUT / "all-MiniLM-L6-v2-fp16"
    model.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    half, worst = {}, 0.0
    for name, t in tensors.items():
        if t.is_floating_point():
            h = t.to(torch.float16)
            if not torch.isfinite(h).all():
                raise SystemExit(f"{name}: a value overflows float16")
            norm = t.float().norm().item()
            worst = max(worst, (h.float() - t.float()).norm().item() / norm if norm > 0 else 0.0)
            half[name] = h
        else:
            half[name] = t
    save_file(half, str(model / "model.safetensors"), metadata={"format": "pt"})
    for f in MODEL_FILES:
        shutil.copy2(src / f, model / f)
    for d in DATA:
        dst = OUT / "cache" / d
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(cache_dir() / d, dst)
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    info = {"model": "all-MiniLM-L6-v2 weights in float16", "max_tensor_rel_rounding_error": worst, "data": list(DATA), "bytes": size}
    (OUT / "assets.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
