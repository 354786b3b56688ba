"""Imported by the fault suite's fork server only (runner.PRELOAD): score a tiny model once, so
that the lazy imports and one-time set-up of transformers, tokenizers, pyarrow and rich are done
before children are forked from it. Torch runs with one thread here and in every child."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path


def _warm() -> None:
    import torch
    from transformers import BertConfig, BertModel

    from attnfallback.cli.app import main
    from attnfallback.model_facts import default_model_path

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="attnfallback-forkserver-"))
    try:
        model_dir = root / "model"
        config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        BertModel(config).save_pretrained(model_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (default_model_path() / name).exists():
                shutil.copy(default_model_path() / name, model_dir / name)
        (root / "in.jsonl").write_text("".join(json.dumps({"text": f"warm up {i}"}) + "\n" for i in range(4)))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(["score", str(model_dir), "--input", str(root / "in.jsonl"), "--output", str(root / "out.parquet"),
                  "--prefer", "eager"])
            main(["score", str(model_dir), "--input", str(root / "in.jsonl"), "--output", str(root / "out.parquet"),
                  "--prefer", "eager", "--resume"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


try:
    _warm()
except Exception:  # noqa: BLE001 - a cold server is only slower, not wrong
    pass
