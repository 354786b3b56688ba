"""Helpers for the scoring tests: input files, seeded texts, tiny models with a twist."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

WORDS = ("the a man woman dog cat plays runs guitar piano quickly slowly over under big small red blue green "
         "house river music book reads writes sings eats apple bread morning night city field").split()


def seeded_texts(n: int, seed: int = 0, min_words: int = 1, max_words: int = 40) -> list[str]:
    """Variable-length sentences, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict] | dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict(rows) if isinstance(rows, dict) else pa.Table.from_pylist(rows)
    pq.write_table(table, path)
    return path


def read_output(path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


def read_events(directory: Path) -> list[dict]:
    records = []
    for path in sorted(Path(directory).rglob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def add_sentence_config(directory: Path, pooling: str = "mean", normalize: bool = True, max_seq_length: int | None = None,
                        hidden: int | None = None) -> Path:
    """Turn a saved encoder into a sentence-transformers model: modules.json, 1_Pooling, Normalize."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    hidden = hidden or json.loads((directory / "config.json").read_text())["hidden_size"]
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, "pooling_mode": pooling}))
    if max_seq_length:
        (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    return directory


def poison_token(directory: Path, token: str = "piano") -> int:
    """Set one token's input embedding to NaN in a saved BERT: rows holding that word give NaN."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    token_id = AutoTokenizer.from_pretrained(directory).convert_tokens_to_ids(token)
    path = directory / "model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[key][token_id] = float("nan")
    save_file({k: v.contiguous() for k, v in weights.items()}, path, metadata={"format": "pt"})
    return token_id


def failing_above(forward, max_rows: int, seen: list, rows_key: str = "input_ids"):
    """`forward` as a GPU too small for more than `max_rows` rows would run it: larger batches raise
    CUDA out-of-memory. Each batch's row count (from `rows_key`'s first dimension) goes to `seen`."""
    import torch

    def limited(batch):
        rows = batch[rows_key].shape[0]
        seen.append(rows)
        if rows > max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(batch)

    return limited


def write_arrow(path, table, stream: bool, chunk: int = 3):
    """An Arrow IPC file (stream: the format `datasets` writes) in batches of `chunk` rows."""
    import pyarrow as pa

    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)
    return path


def save_like_datasets(directory, table, shards: int = 2):
    """What `Dataset.save_to_disk` writes: Arrow stream files listed in state.json, and dataset_info.json."""
    directory.mkdir()
    per = -(-table.num_rows // shards)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": {}}})})
    for i, name in enumerate(names):
        write_arrow(directory / name, table.slice(i * per, per).replace_schema_metadata(schema.metadata), stream=True, chunk=2)
    (directory / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123abcd", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": "test"}))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {"id": {"dtype": "string", "_type": "Value"}}}))
    return directory


def copy_tokenizer(directory: Path) -> Path:
    """Give a model saved by hand the embedded MiniLM's tokenizer (vocab 30522)."""
    import shutil

    from attnfallback.model_facts import default_model_path

    src = default_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, Path(directory) / name)
    return Path(directory)
