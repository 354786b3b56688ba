"""The sentence-transformers configuration of an embedding model: its pooling, normalisation and
maximum length, as modules.json, 1_Pooling/config.json and sentence_bert_config.json say."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnfallback.errors import UnknownNameError, UsageError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class SentenceConfig:
    """What the model's sentence-transformers files say: pooling, normalisation, max length."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    include_prompt: bool = True
    source: str = "default (no modules.json: mean pooling, no normalisation)"


def read_sentence_config(model_dir: str | Path) -> SentenceConfig:
    """Pooling and normalisation from modules.json / 1_Pooling/config.json / sentence_bert_config.json.

    A module other than Transformer, Pooling and Normalize (Dense, say) is refused by name rather
    than silently dropped.
    """
    root = Path(model_dir)
    modules_path = root / "modules.json"
    if not modules_path.is_file():
        return SentenceConfig()
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise UsageError(f"{modules_path}: expected a JSON list of modules")
    pooling: tuple[str, ...] = ("mean",)
    include_prompt = True
    normalize = False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pooling, include_prompt = _read_pooling(root / str(module.get("path", "")) / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise UsageError(f"{modules_path}: sentence-transformers module {module.get('type')!r} is not supported by "
                             "`score --task embed` (supported: Transformer, Pooling, Normalize)")
    max_len = None
    lower = False
    st_config = root / "sentence_bert_config.json"
    if st_config.is_file():
        data = _read_json(st_config)
        if isinstance(data, dict):
            max_len = data.get("max_seq_length")
            lower = bool(data.get("do_lower_case", False))
    return SentenceConfig(pooling, normalize, int(max_len) if max_len else None, lower, include_prompt, str(modules_path))


def _read_pooling(path: Path) -> tuple[tuple[str, ...], bool]:
    if not path.is_file():
        return ("mean",), True
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    mode = data.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if data.get(key))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    for m in modes:
        if m not in POOLING_MODES:
            raise UnknownNameError("pooling mode", m, POOLING_MODES)
    return modes or ("mean",), bool(data.get("include_prompt", True))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
