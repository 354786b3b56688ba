"""`run_score` end to end on tiny random models: order, ids, values, shards, bad rows, events,
tasks against a direct per-row computation, OOM splitting, non-finite rows, truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnfallback.errors import InputError, NonFiniteError, UsageError
from attnfallback.events import validate
from attnfallback.scoring import ScoreJob, Scorer, run_score
from conftest import build_tiny_model
from scoring_helpers import add_sentence_config, failing_above, read_events, read_output, seeded_texts, write_jsonl, write_parquet

TOL = 1e-5


@pytest.fixture(scope="module")
def st_bert(tmp_path_factory):
    return add_sentence_config(build_tiny_model(tmp_path_factory.mktemp("st-bert"), "bert"), pooling="mean", normalize=True)


@pytest.fixture(scope="module")
def texts():
    return seeded_texts(61, seed=11, max_words=60)


@pytest.fixture
def input_file(tmp_path, texts):
    return write_jsonl(tmp_path / "in.jsonl", [{"key": f"r{i:03d}", "text": t} for i, t in enumerate(texts)])


def job_for(model, input_file, output, **kw) -> ScoreJob:
    kw.setdefault("quiet", True)
    kw.setdefault("device", "cpu")  # compared with float32 references computed on the CPU, also on a GPU machine
    return ScoreJob(model=str(model), input=str(input_file), output=str(output), **kw)


def reference_embeddings(model_dir, texts, max_length=512):
    """One row at a time, no padding: mean pooling then L2 normalisation."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    out = []
    with torch.inference_mode():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=max_length)
            h = model(**enc).last_hidden_state[0].mean(0)
            out.append(torch.nn.functional.normalize(h, dim=0).numpy())
    return np.stack(out)


def test_embed_keeps_input_order_ids_and_matches_a_row_by_row_computation(st_bert, input_file, texts, tmp_path):
    result = run_score(job_for(st_bert, input_file, tmp_path / "out.parquet", id_column="key", batch_tokens=300, part_rows=16))
    out = read_output(tmp_path / "out.parquet")
    assert list(out) == ["id", "embedding"]
    assert out["id"] == [f"r{i:03d}" for i in range(len(texts))]
    got = np.array(out["embedding"], dtype=np.float32)
    assert np.abs(got - reference_embeddings(st_bert, texts)).max() < TOL
    assert result.rows_in == result.rows_written == len(texts) and result.rows_skipped == 0
    assert result.parts == 4 and result.tokens > 0 and result.task["pooling"] == ["mean"] and result.task["normalize"]
    assert result.task["tokenizer"] == "in the worker thread"  # on the CPU: no child process
    assert not (tmp_path / ".out.parquet.parts").exists() and not (tmp_path / ".out.parquet.lock").exists()


@pytest.mark.parametrize("pooling", ["cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"])
def test_pooling_modes_match_sentence_transformers(tmp_path, pooling, texts):
    from sentence_transformers import SentenceTransformer

    model_dir = add_sentence_config(build_tiny_model(tmp_path / "m", "bert"), pooling=pooling, normalize=False)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts[:20]])
    run_score(job_for(model_dir, path, tmp_path / "out.parquet", batch_tokens=256))
    got = np.array(read_output(tmp_path / "out.parquet")["embedding"], dtype=np.float32)
    st = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    want = st.encode(texts[:20], batch_size=7, convert_to_numpy=True)
    assert np.abs(got - want).max() < TOL


def test_shards_together_equal_the_unsharded_run(st_bert, input_file, tmp_path):
    run_score(job_for(st_bert, input_file, tmp_path / "all.parquet", id_column="key", batch_tokens=400, part_rows=10))
    whole = read_output(tmp_path / "all.parquet")
    ids, vectors = [], []
    for i in range(3):
        r = run_score(job_for(st_bert, input_file, tmp_path / f"s{i}.parquet", id_column="key", shard=f"{i}/3", batch_tokens=400, part_rows=10))
        part = read_output(tmp_path / f"s{i}.parquet")
        assert r.rows_written == len(part["id"]) == len(range(i, 61, 3))
        ids += part["id"]
        vectors += part["embedding"]
    order = np.argsort(ids)
    assert [ids[i] for i in order] == whole["id"]
    assert np.abs(np.array(vectors)[order] - np.array(whole["embedding"])).max() < 1e-6


def test_bad_rows_are_an_error_by_default_and_nothing_is_written(st_bert, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "one"}\n{"text": ""}\n{"text": "three"}\n')
    with pytest.raises(InputError) as e:
        run_score(job_for(st_bert, path, tmp_path / "out.parquet"))
    assert e.value.line == 2 and e.value.exit_code == 2 and "empty text" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_skipped_rows_are_listed_and_every_row_is_accounted_for(st_bert, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": 10, "text": "one"}\n{"id": 11, "text": null}\n{"id": 12, "text": "three"}\nnot json\n'
                     b'{"id": 10, "text": "dup"}\n{"id": 15, "text": "bad \xff"}\n{"id": 16, "text": "six"}\n')
    events = tmp_path / "events"
    result = run_score(job_for(st_bert, path, tmp_path / "out.parquet", id_column="id", on_bad_row="skip", events=str(events), run_id="r1"))
    assert result.rows_in == 7 and result.rows_written == 3 and result.rows_skipped == 4
    assert result.skipped_lines == [2, 4, 5, 6]
    assert read_output(tmp_path / "out.parquet")["id"] == [10, 12, 16]
    kinds = [e["event"] for e in read_events(events)]
    assert kinds == ["attn_impl", "shard_start", "shard_done"]
    done = read_events(events)[-1]
    assert validate(done) == []
    assert done["rows"] == 7 and done["rows_written"] == 3 and done["rows_skipped"] == 4
    assert [s["line"] for s in done["skipped"]] == [2, 4, 5, 6]
    assert done["tokens"] == result.tokens and done["non_finite"] == 0 and done["tokens_per_s"] > 0


def test_texts_over_max_length_are_truncated_and_counted(st_bert, tmp_path):
    huge = "word " * 60_000  # 300k characters: cut before tokenizing, still counted as truncated
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "word " * 3000}, {"text": "short one"}, {"text": "x " * 9}, {"text": huge}])
    result = run_score(job_for(st_bert, path, tmp_path / "out.parquet", max_length=12))
    assert result.truncated == 2 and result.rows_written == 4
    assert result.tokens == 12 + 4 + 11 + 12
    out = np.array(read_output(tmp_path / "out.parquet")["embedding"])
    assert np.abs(out[0] - out[3]).max() < 1e-6  # the same first 12 tokens, cut or not


def test_output_of_a_completed_run_is_refused_unless_resume(st_bert, input_file, tmp_path):
    from attnfallback.errors import OutputError

    out = tmp_path / "out.parquet"
    first = run_score(job_for(st_bert, input_file, out))
    with pytest.raises(OutputError, match="exists from a completed run"):
        run_score(job_for(st_bert, input_file, out))
    again = run_score(job_for(st_bert, input_file, out, resume=True))
    assert again.already_complete and again.rows_written == first.rows_written
    with pytest.raises(OutputError, match="different job.*max_length"):
        run_score(job_for(st_bert, input_file, out, resume=True, max_length=16))
    foreign = tmp_path / "foreign.parquet"
    write_parquet(foreign, {"x": [1]})
    with pytest.raises(OutputError, match="not written by attnfallback"):
        run_score(job_for(st_bert, input_file, foreign, resume=True))


def test_a_second_run_on_a_locked_output_is_refused(st_bert, input_file, tmp_path):
    from attnfallback.errors import OutputError
    from attnfallback.scoring.writer import PartStore

    holder = PartStore(tmp_path / "out.parquet")
    holder.open("holder-run")
    try:
        with pytest.raises(OutputError, match="locked by another run.*holder-run"):
            run_score(job_for(st_bert, input_file, tmp_path / "out.parquet"))
    finally:
        holder.close()
    run_score(job_for(st_bert, input_file, tmp_path / "out.parquet"))


def kill_at_part(monkeypatch, index: int):
    """Make committing part `index` raise KeyboardInterrupt (a killed run); returns the undo."""
    from attnfallback.scoring import writer

    real = writer.PartStore.commit_part

    def crash(self, table, info):
        if info.index == index:
            raise KeyboardInterrupt("simulated kill")
        return real(self, table, info)

    monkeypatch.setattr(writer.PartStore, "commit_part", crash)
    return lambda: monkeypatch.setattr(writer.PartStore, "commit_part", real)


def test_a_crash_between_parts_resumes_to_the_clean_result(st_bert, input_file, tmp_path, monkeypatch):
    from attnfallback.errors import OutputError

    run_score(job_for(st_bert, input_file, tmp_path / "clean.parquet", part_rows=8))
    clean = read_output(tmp_path / "clean.parquet")
    undo = kill_at_part(monkeypatch, 3)
    out = tmp_path / "out.parquet"
    with pytest.raises(KeyboardInterrupt):
        run_score(job_for(st_bert, input_file, out, part_rows=8))
    undo()
    assert not out.exists()
    # the final file grown during the run is gone; the three committed parts stay for --resume
    assert not list(tmp_path.glob(".out.parquet.tmp-*"))
    assert sorted(p.name for p in (tmp_path / ".out.parquet.parts").glob("part-*.parquet")) == [f"part-{i:05d}.parquet" for i in range(3)]
    with pytest.raises(OutputError, match="pass --resume"):
        run_score(job_for(st_bert, input_file, out, part_rows=8))
    with pytest.raises(OutputError, match="different job.*part_rows"):
        run_score(job_for(st_bert, input_file, out, part_rows=9, resume=True))
    result = run_score(job_for(st_bert, input_file, out, part_rows=8, resume=True))
    assert result.resumed_parts == 3 and result.rows_written == 61
    got = read_output(out)
    assert got["id"] == clean["id"]
    assert np.array_equal(np.array(got["embedding"]), np.array(clean["embedding"]))


def test_the_first_parts_are_smaller_than_part_rows():
    from itertools import islice

    from attnfallback.scoring.job import FIRST_PART_ROWS, part_sizes

    assert list(islice(part_sizes(8192), 6)) == [1024, 2048, 4096, 8192, 8192, 8192]
    assert FIRST_PART_ROWS == 1024
    assert list(islice(part_sizes(700), 3)) == [700, 700, 700]
    assert list(islice(part_sizes(8192, 512), 3)) == [512, 1024, 2048]
    assert list(islice(part_sizes(10), 3)) == [10, 10, 10]
    assert list(islice(part_sizes(8192, 8192), 2)) == [8192, 8192]


def test_parts_follow_the_schedule_and_resume_on_it(st_bert, input_file, tmp_path, monkeypatch):
    """With a first part of 2 rows (so 61 rows make several growing parts): the parts are 2, 4, 8,
    8, ... rows, a run killed after three parts resumes to the clean output, and a partial output
    made under another first-part size is refused, not misread."""
    import pyarrow.parquet as pq

    from attnfallback.errors import OutputError

    clean = run_score(job_for(st_bert, input_file, tmp_path / "clean.parquet", part_rows=8, first_part_rows=2))
    sizes = [pq.ParquetFile(tmp_path / "clean.parquet").metadata.row_group(i).num_rows for i in range(clean.parts)]
    assert sizes == [2, 4] + [8] * 6 + [7] and sum(sizes) == 61
    undo = kill_at_part(monkeypatch, 3)
    out = tmp_path / "out.parquet"
    with pytest.raises(KeyboardInterrupt):
        run_score(job_for(st_bert, input_file, out, part_rows=8, first_part_rows=2))
    undo()
    with pytest.raises(OutputError, match="different job.*first_part_rows"):
        run_score(job_for(st_bert, input_file, out, part_rows=8, first_part_rows=4, resume=True))
    result = run_score(job_for(st_bert, input_file, out, part_rows=8, first_part_rows=2, resume=True))
    assert result.resumed_parts == 3 and result.rows_written == 61
    got, want = read_output(out), read_output(tmp_path / "clean.parquet")
    assert got["id"] == want["id"]
    assert np.array_equal(np.array(got["embedding"]), np.array(want["embedding"]))


def test_disk_full_while_writing_a_part_is_a_clear_error_with_nothing_visible(st_bert, input_file, tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    from attnfallback.errors import OutputError

    calls = []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    real = pq.write_table
    monkeypatch.setattr(pq, "write_table", full_disk)
    events = tmp_path / "events"
    with pytest.raises(OutputError, match="no space left on device"):
        run_score(job_for(st_bert, input_file, tmp_path / "out" / "o.parquet", part_rows=8, events=str(events)))
    out_dir = tmp_path / "out"
    assert not (out_dir / "o.parquet").exists()
    visible = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")]
    assert visible == []
    parts = sorted(p.name for p in (out_dir / ".o.parquet.parts").iterdir())
    assert parts == ["manifest.json", "part-00000.parquet"]  # the committed part stays, no temp file
    failed = read_events(events)[-1]
    assert failed["event"] == "shard_failed" and "no space left" in failed["message"] and failed["parts_committed"] == 1


def test_read_only_output_location_is_refused_before_the_model_loads(st_bert, input_file, tmp_path, monkeypatch):
    import errno
    import os

    from attnfallback import loader
    from attnfallback.errors import OutputError

    real_open = os.open
    target = str(tmp_path / "ro")

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(target) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    with pytest.raises(OutputError, match="read-only file system"):
        run_score(job_for(st_bert, input_file, tmp_path / "ro" / "o.parquet"))
    assert list((tmp_path / "ro").iterdir()) == []


def test_out_of_memory_splits_the_batch_and_loses_no_row(st_bert, input_file, tmp_path, monkeypatch):
    from attnfallback.scoring import pipeline

    clean = run_score(job_for(st_bert, input_file, tmp_path / "clean.parquet", batch_tokens=2000))
    real_from_job = pipeline.Scorer.from_job.__func__
    seen = []

    def from_job_with_small_memory(cls, job, **kw):
        scorer = real_from_job(cls, job, **kw)
        scorer.task.forward = failing_above(scorer.task.forward, 5, seen)
        return scorer

    monkeypatch.setattr(pipeline.Scorer, "from_job", classmethod(from_job_with_small_memory))
    events = tmp_path / "events"
    result = run_score(job_for(st_bert, input_file, tmp_path / "out.parquet", batch_tokens=2000, events=str(events)))
    assert result.oom_splits > 0 and max(seen) > 5
    assert result.rows_written == clean.rows_written == 61
    a, b = read_output(tmp_path / "out.parquet"), read_output(tmp_path / "clean.parquet")
    assert a["id"] == b["id"]
    assert np.abs(np.array(a["embedding"]) - np.array(b["embedding"])).max() < TOL
    splits = [e for e in read_events(events) if e["event"] == "oom_split"]
    assert len(splits) == result.oom_splits and all(validate(e) == [] for e in splits)
    assert splits[0]["rows"] > 5 and sum(splits[0]["halves"]) == splits[0]["rows"]


def test_non_finite_rows_are_refused_by_id(nan_bert, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"k": "a", "text": "a man plays guitar"}, {"k": "b", "text": "a man plays piano"}])
    with pytest.raises(NonFiniteError, match="'b'") as e:
        run_score(job_for(nan_bert, path, tmp_path / "out.parquet", id_column="k"))
    assert e.value.ids == ["b"]
    assert not (tmp_path / "out.parquet").exists()


def test_non_finite_rows_are_flagged_when_asked(nan_bert, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a man plays guitar"}, {"text": "a man plays piano"}, {"text": "the piano"}])
    events = tmp_path / "events"
    result = run_score(job_for(nan_bert, path, tmp_path / "out.parquet", on_nonfinite="flag", events=str(events)))
    out = read_output(tmp_path / "out.parquet")
    assert out["nonfinite"] == [False, True, True] and result.nonfinite == 2
    assert np.isfinite(out["embedding"][0]).all() and not np.isfinite(out["embedding"][1]).all()
    assert [e["non_finite"] for e in read_events(events) if e["event"] == "shard_done"] == [2]


def test_unknown_task_and_modes_are_usage_errors(st_bert, input_file, tmp_path):
    from attnfallback.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="embed, classify, pairs, logprob"):
        run_score(job_for(st_bert, input_file, tmp_path / "o.parquet", task="rank"))
    with pytest.raises(UsageError, match="on-bad-row"):
        run_score(job_for(st_bert, input_file, tmp_path / "o.parquet", on_bad_row="ignore"))


# --- the other tasks, against a direct computation -----------------------------------------------

def test_classify_with_several_labels_and_with_one(tmp_path, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts[:12]])
    for kind, labels in (("bert-classify", 3), ("qwen2-classify", 1)):
        model_dir = build_tiny_model(tmp_path / kind, kind, num_labels=labels)
        out_path = tmp_path / f"{kind}.parquet"
        run_score(job_for(model_dir, path, out_path, task="classify", batch_tokens=256))
        out = read_output(out_path)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        with torch.inference_mode():
            want = np.stack([model(**tok(t, return_tensors="pt")).logits[0].numpy() for t in texts[:12]])
        if labels == 1:
            assert list(out) == ["id", "score"]
            assert np.abs(np.array(out["score"]) - want[:, 0]).max() < TOL
        else:
            assert list(out) == ["id", "scores", "label"]
            assert np.abs(np.array(out["scores"]) - want).max() < TOL
            assert out["label"] == [f"LABEL_{i}" for i in want.argmax(1)]


def test_pairs_score_two_columns_as_a_cross_encoder(tmp_path, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = build_tiny_model(tmp_path / "ce", "bert-classify", num_labels=1)
    rows = [{"q": a, "d": b} for a, b in zip(texts[:10], texts[20:30])]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    run_score(job_for(model_dir, path, tmp_path / "out.parquet", task="pairs", text_columns=["q", "d"], batch_tokens=300))
    out = read_output(tmp_path / "out.parquet")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        want = [model(**tok(r["q"], r["d"], return_tensors="pt")).logits[0, 0].item() for r in rows]
    assert np.abs(np.array(out["score"]) - np.array(want)).max() < TOL


def direct_logprob(model, ids: list[int], start: int) -> tuple[float, int]:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    picked = [lp[t, ids[t + 1]].item() for t in range(start, len(ids) - 1)]
    return sum(picked), len(picked)


def test_logprob_of_texts_and_of_completions(tiny_qwen2, tmp_path, texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2).eval()
    short = seeded_texts(16, seed=5, max_words=12)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in short[:8]])
    run_score(job_for(tiny_qwen2, path, tmp_path / "a.parquet", task="logprob", batch_tokens=64))
    out = read_output(tmp_path / "a.parquet")
    assert list(out) == ["id", "logprob_sum", "logprob_mean", "tokens"]
    for i, t in enumerate(short[:8]):
        total, n = direct_logprob(model, tok(t)["input_ids"], 0)
        assert out["tokens"][i] == n
        assert abs(out["logprob_sum"][i] - total) < 1e-3 and abs(out["logprob_mean"][i] - total / n) < 1e-4

    rows = [{"prompt": a, "completion": b} for a, b in zip(short[:4], short[8:12])]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    run_score(job_for(tiny_qwen2, path, tmp_path / "b.parquet", task="logprob", text_columns=["prompt", "completion"]))
    out = read_output(tmp_path / "b.parquet")
    for i, r in enumerate(rows):
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"]
        total, n = direct_logprob(model, p + c, len(p) - 1)
        assert out["tokens"][i] == n == len(c)
        assert abs(out["logprob_sum"][i] - total) < 1e-3


# --- the Scorer, as Ray actors use it --------------------------------------------------------------

def test_scorer_scores_tables_in_order_and_is_reusable(st_bert, texts):
    import pyarrow as pa

    scorer = Scorer.from_job(ScoreJob(model=str(st_bert), batch_tokens=200, device="cpu"))
    assert scorer.decision.used in ("sdpa", "eager")
    assert [f.name for f in scorer.output_schema] == ["id", "embedding"]
    table = pa.table({"id": list(range(100, 130)), "text": texts[:30]})
    out = scorer.score_table(table)
    assert out.column_names == ["id", "embedding"] and out.column("id").to_pylist() == list(range(100, 130))
    want = reference_embeddings(st_bert, texts[:30])
    assert np.abs(np.array(out.column("embedding").to_pylist()) - want).max() < TOL
    again = scorer.score_table(pa.table({"text": texts[30:35]}))
    assert again.column("id").to_pylist() == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match="empty text"):
        scorer.score_table(pa.table({"text": ["fine", ""]}))


def test_a_loaded_scorer_is_reused_across_runs(st_bert, input_file, texts, tmp_path):
    fresh = run_score(job_for(st_bert, input_file, tmp_path / "fresh.parquet"))
    scorer = Scorer.from_job(job_for(st_bert, input_file, tmp_path / "unused.parquet"))
    second = write_jsonl(tmp_path / "second.jsonl", [{"text": t} for t in texts[:7]])
    reused = run_score(job_for(st_bert, input_file, tmp_path / "reused.parquet"), scorer=scorer)
    again = run_score(job_for(st_bert, second, tmp_path / "again.parquet"), scorer=scorer)
    assert reused.rows_written == fresh.rows_written == 61 and again.rows_written == 7
    a, b = read_output(tmp_path / "reused.parquet"), read_output(tmp_path / "fresh.parquet")
    assert a["id"] == b["id"] and np.abs(np.array(a["embedding"]) - np.array(b["embedding"])).max() < TOL
    assert np.abs(np.array(read_output(tmp_path / "again.parquet")["embedding"]) - np.array(b["embedding"][:7])).max() < TOL
    with pytest.raises(UsageError, match="loaded for task embed, the job is for classify"):
        run_score(job_for(st_bert, input_file, tmp_path / "wrong.parquet", task="classify"), scorer=scorer)


def test_the_output_is_one_row_group_a_part_with_no_dictionary_or_statistics_on_embeddings(st_bert, input_file, tmp_path):
    import pyarrow.parquet as pq

    from attnfallback.scoring.writer import read_output_metadata

    out = tmp_path / "out.parquet"
    result = run_score(job_for(st_bert, input_file, out, part_rows=16))
    meta = pq.ParquetFile(out).metadata
    assert meta.num_row_groups == result.parts == 4
    assert [meta.row_group(i).num_rows for i in range(4)] == [16, 16, 16, 13]
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    embedding = meta.row_group(0).column(names.index("embedding.list.element"))
    ids = meta.row_group(0).column(names.index("id"))
    assert not any("DICTIONARY" in e for e in embedding.encodings) and not embedding.is_stats_set
    assert ids.is_stats_set and ids.statistics.min == 0
    assert read_output_metadata(out)["result"]["rows_written"] == 61
    assert result.padded_tokens > result.tokens > 0  # rows of different lengths, padded batches on the CPU



def test_a_job_round_trips_through_its_dict_and_json():
    import json
    from dataclasses import fields

    job = ScoreJob(model="m", input="in.jsonl", output="out.parquet", task="pairs", text_columns=["a", "b"], id_column="",
                   shard="1/3", prefer=["flash_attention_2", "sdpa"], policy="strict", dtype="float16", device="cuda",
                   batch_tokens=4096, max_length=128, events="ev", run_id="r-1", resume=True, on_bad_row="skip",
                   on_nonfinite="flag", quiet=True, revision="abc", trust_remote_code=True, part_rows=64, first_part_rows=8,
                   packing="off", tokenizer_process="off", measure="off", allow_new_head=True)
    d = job.to_dict()
    assert set(d) == {f.name for f in fields(ScoreJob)}
    assert ScoreJob.from_dict(json.loads(json.dumps(d))) == job
    assert ScoreJob.from_dict({}) == ScoreJob()  # a missing field takes its default
    assert ScoreJob.from_dict({"prefer": "sdpa,eager"}).prefer == "sdpa,eager"  # as the --prefer flag gives it


@pytest.mark.parametrize("data,message", [
    ({"model": "m", "modle": "x", "shards": 2}, r"job.json: unknown key\(s\) in the scoring job: 'modle', 'shards'; valid keys: model, "),
    ({"part_rows": "64"}, "job.json: part_rows in the scoring job must be an integer, found '64'"),
    ({"part_rows": True}, "part_rows in the scoring job must be an integer, found True"),
    ({"resume": 1}, "resume in the scoring job must be true or false, found 1"),
    ({"text_columns": ["a", 2]}, r"text_columns in the scoring job must be a list of strings or null, found \['a', 2\]"),
    (["model"], "job.json: a scoring job must be a JSON object of its fields, found list"),
])
def test_a_job_dict_with_unknown_keys_or_wrong_types_is_a_usage_error_naming_them(data, message):
    with pytest.raises(UsageError, match=message):
        ScoreJob.from_dict(data, where="job.json")
