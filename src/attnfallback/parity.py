"""Parity: the same rows through each attention implementation, compared with a reference.

    report = run_parity("default", read_texts("stsb-en-test.csv"), impls=["sdpa"], dtype="bfloat16")
    report.passed, report.tolerance, report.results["sdpa"].metrics["rel_l2"]

The weights are read once per dtype: the model loads with the reference implementation and is
switched in place (`set_attn_implementation`) to each candidate, which must pass the loader's
verification forward first. Candidates that cannot run here are reported with their reasons.
Rows run through the scorer's own task code (scoring.tokenize, scoring.collate, scoring.tasks: tokenization, batching, pooling), so
parity measures what `score` would write.

Default tolerance (on the relative L2 error of the outputs): twice the error the reference itself
shows in this dtype against an fp32 run of itself on the same rows, never below
`TOLERANCE_FLOOR[dtype]`. The floor matters when that calibration error is ~0, as it is in fp32
(the reference *is* its own fp32 run): 1e-5 in fp32 (about 80 fp32 roundings, room for another
summation order over a deep model; sdpa against eager on all-MiniLM-L6-v2 measured 4.6e-7 on CPU),
and about one rounding of the outputs in the half types (unit roundoff: fp16 4.9e-4, bf16 3.9e-3).
"""

from __future__ import annotations

import csv
import gc
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnfallback.errors import InputError, UnknownNameError, UsageError
from attnfallback.events import NULL_SINK
from attnfallback.loader import load_model, plan_reasons
from attnfallback.policy import DEFAULT_PREFER, Policy, parse_dtype, parse_impl
from attnfallback.scoring.inputs import ROW_NUMBER_ID, iter_rows, open_input, resolve_spec
from attnfallback.scoring.job import ScoreJob
from attnfallback.scoring.chunks import Chunk
from attnfallback.scoring.pipeline import Scorer, model_kwargs_for
from attnfallback.scoring.tasks import AUTO_CLASSES
from attnfallback.verify import first_line, switch_to

log = logging.getLogger("attnfallback")

from attnfallback.task_names import TASKS, default_text_columns  # noqa: E402
TOLERANCE_FLOOR = {"float32": 1e-5, "float16": 5e-4, "bfloat16": 4e-3}
DEFAULT_TOP_K = 10
QUERY_ROWS = 8  # embeddings of unpaired texts: rank every row by similarity to each of these
STSB_COLUMNS = ("sentence1", "sentence2", "score")


# --- inputs ------------------------------------------------------------------------------------


@dataclass
class TextRows:
    """Texts read from an input: one list per text column, and gold scores when the file has them."""

    columns: list[list[str]]
    names: list[str]
    labels: np.ndarray | None = None
    skipped: int = 0  # rows with a problem (null or empty text, malformed line), reported
    source: str = ""

    @property
    def rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def texts(self) -> list[str]:
        """Every text, row by row (row i's columns side by side), for single-text tasks."""
        return [t for row in zip(*self.columns) for t in row]

    def pairs(self) -> list[tuple[str, str]]:
        if len(self.columns) != 2:
            raise UsageError(f"the pairs task needs two text columns, found {len(self.columns)}")
        return list(zip(self.columns[0], self.columns[1]))


def _looks_like_stsb(path: Path) -> bool:
    """The STS-B CSV as published: no header, rows of sentence1,sentence2,score."""
    if path.suffix.lower() != ".csv":
        return False
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        first = next(csv.reader(fh), None)
    if not first or len(first) != 3:
        return False
    try:
        float(first[2])
    except ValueError:
        return False
    return True


def _read_stsb(path: Path, wanted: list[str], rows: int | None) -> TextRows:
    columns: list[list[str]] = [[] for _ in wanted]
    labels: list[float] = []
    skipped = 0
    with open(path, encoding="utf-8", newline="") as fh:
        for line_no, fields in enumerate(csv.reader(fh), start=1):
            if rows is not None and len(labels) >= rows:
                break
            if not fields:
                continue
            if len(fields) != 3:
                raise InputError("malformed STS-B row", path=str(path), line=line_no, expected="3 fields (sentence1,sentence2,score)", found=f"{len(fields)} fields")
            record = dict(zip(STSB_COLUMNS, fields))
            if not all(record[name].strip() for name in wanted):
                skipped += 1
                continue
            try:
                labels.append(float(record["score"]))
            except ValueError:
                raise InputError("malformed STS-B score", path=str(path), line=line_no, expected="a number", found=repr(record["score"])) from None
            for column, name in zip(columns, wanted):
                column.append(record[name])
    return TextRows(columns, list(wanted), np.asarray(labels, dtype=np.float64), skipped, str(path))


def read_texts(
    path: str | os.PathLike,
    text_columns: list[str] | None = None,
    rows: int | None = None,
    task: str = "embed",
) -> TextRows:
    """Texts from any input the score command reads (its reader: JSONL, CSV/TSV, Parquet, Arrow ...).

    A header-less CSV of `sentence1,sentence2,score` rows (STS-B as published) is read as such:
    both sentences by default, and the scores kept as gold labels. `rows` keeps the first N rows.
    Rows with a null or empty text are skipped and counted.
    """
    path = Path(path)
    if rows is not None and rows < 1:
        raise UsageError(f"--rows must be >= 1, found {rows}")
    wanted = list(text_columns) if text_columns else None
    if path.is_file() and _looks_like_stsb(path) and (wanted is None or set(wanted) <= set(STSB_COLUMNS[:2])):
        return _read_stsb(path, wanted or list(STSB_COLUMNS[:2]), rows)
    source = open_input(path)
    spec = resolve_spec(source, default_text_columns(task), None, wanted, ROW_NUMBER_ID)  # ids play no part here
    columns: list[list[str]] = [[] for _ in spec.text_columns]
    skipped = 0
    for row in iter_rows(source, spec):
        if rows is not None and row.number >= rows:
            break
        if row.problem is not None:
            skipped += 1
            log.warning("%s:%s: skipped (%s)", path, row.line, row.problem)
            continue
        for column, text in zip(columns, row.texts):
            column.append(text)
    if not columns[0]:
        raise InputError("no usable rows", path=str(path), expected="at least one row with text", found=f"{skipped} skipped")
    return TextRows(columns, list(spec.text_columns), None, skipped, str(path))


# --- running the model over rows ---------------------------------------------------------------


def score_job_for(model: str, task: str, columns: int, batch_tokens: int | None = None, revision: str | None = None,
                  trust_remote_code: bool = False):
    """The scorer's job description for `task` over `columns` text columns (non-finite rows flagged, not fatal)."""
    text_columns = [f"text{i}" for i in range(columns)] if columns > 1 else None
    return ScoreJob(model=model, task=task, text_columns=text_columns, batch_tokens=batch_tokens, on_nonfinite="flag",
                    revision=revision, trust_remote_code=trust_remote_code)


def inputs_for(rows: TextRows, task: str) -> list[tuple[str, ...]]:
    """The scorer's row tuples: one text each (every column's texts, row by row), or the columns side by side."""
    if task in ("pairs", "logprob") and len(rows.columns) == 2:
        return list(zip(*rows.columns))
    if task == "pairs":
        rows.pairs()  # raises: pairs needs two columns
    return [(t,) for t in rows.texts()]


def outputs_for(loaded, inputs: list[tuple[str, ...]], job) -> np.ndarray:
    """The model's outputs for `inputs`, float32, one row per input, in input order.

    Runs the scorer's own task code (tokenization, length-sorted token-budget batches, pooling):
    embed -> the embedding; classify/pairs -> the logits; logprob -> the log-likelihood sum.
    """
    scorer = Scorer.from_job(job, loaded=loaded)
    result = scorer.run(scorer.prepare(Chunk(0, list(range(len(inputs))), list(inputs))))
    n = len(inputs)
    columns = result.columns
    for name in ("embedding", "scores", "score", "logprob_sum"):
        if name in columns:
            column = columns[name]
            if hasattr(column, "flatten"):  # a list column: one vector per row
                return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, -1)
            return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, 1)
    raise UsageError(f"the {job.task} task produced no comparable output (columns: {', '.join(columns)})")


# --- comparison --------------------------------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    x = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    edges = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
    starts, stops = edges[:-1], edges[1:]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + stops - 1) / 2.0 + 1.0, stops - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (NaN when either side is constant)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (scipy when installed, else an exact pairwise count in chunks)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    try:
        from scipy.stats import kendalltau
    except ImportError:
        kendalltau = None
    if kendalltau is not None:
        return float(kendalltau(a, b).statistic)
    n = len(a)
    s = ties_free_a = ties_free_b = 0.0
    chunk = max(1, 4_000_000 // max(n, 1))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        upper = np.arange(n)[None, :] > np.arange(start, stop)[:, None]
        sa = np.sign(a[None, :] - a[start:stop, None]) * upper
        sb = np.sign(b[None, :] - b[start:stop, None]) * upper
        s += float((sa * sb).sum())
        ties_free_a += float(np.abs(sa).sum())
        ties_free_b += float(np.abs(sb).sum())
    denom = math.sqrt(ties_free_a * ties_free_b)
    return s / denom if denom > 0 else float("nan")


def top_k_agreement(out_scores: np.ndarray, ref_scores: np.ndarray, k: int) -> float:
    """Share of the reference's top-k (per row of a 2-D array) that the outputs rank top-k too."""
    out2 = np.atleast_2d(out_scores)
    ref2 = np.atleast_2d(ref_scores)
    k = max(1, min(k, out2.shape[1]))
    shares = []
    for o, r in zip(out2, ref2):
        top_o = set(np.argsort(-o, kind="stable")[:k].tolist())
        top_r = set(np.argsort(-r, kind="stable")[:k].tolist())
        shares.append(len(top_o & top_r) / k)
    return float(np.mean(shares))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def scalar_scores(outputs: np.ndarray, task: str, paired: bool) -> np.ndarray:
    """The scores a user would rank by.

    embed, paired texts (row 2i with row 2i+1): the cosine of each pair (STS-B's prediction);
    embed, single texts: cosine of every row to each of the first QUERY_ROWS rows (one row of
    scores per query, itself excluded); classify/pairs: the single logit, or the log-probability
    of the last class when there are several.
    """
    if task == "embed":
        unit = _unit_rows(outputs.astype(np.float64))
        if paired:
            return (unit[0::2] * unit[1::2]).sum(axis=1)
        queries = min(QUERY_ROWS, len(unit))
        sims = unit[:queries] @ unit.T
        sims[np.arange(queries), np.arange(queries)] = -np.inf
        return sims
    logits = outputs.astype(np.float64)
    if logits.ndim == 1 or logits.shape[1] == 1:
        return logits.reshape(-1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted[:, -1] - np.log(np.exp(shifted).sum(axis=1))


def relative_l2(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| over every value."""
    ref64 = ref.astype(np.float64)
    return float(np.linalg.norm(out.astype(np.float64) - ref64) / max(np.linalg.norm(ref64), 1e-30))


def compare(out: np.ndarray, ref: np.ndarray, task: str, *, paired: bool = False, top_k: int = DEFAULT_TOP_K) -> dict:
    """Metrics of `out` against the reference outputs `ref` (same rows, same order)."""
    if out.shape != ref.shape:
        raise ValueError(f"output shapes differ: {out.shape} against the reference's {ref.shape}")
    metrics: dict[str, Any] = {
        "rel_l2": relative_l2(out, ref),
        "max_abs": float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()) if out.size else 0.0,
    }
    if task == "embed":
        cos = (_unit_rows(out.astype(np.float64)) * _unit_rows(ref.astype(np.float64))).sum(axis=1)
        metrics["min_cosine"] = float(cos.min()) if len(cos) else float("nan")
    s_out, s_ref = scalar_scores(out, task, paired), scalar_scores(ref, task, paired)
    finite = np.isfinite(s_ref) & np.isfinite(s_out)
    if finite.sum() >= 2:
        metrics["spearman"] = spearman(s_out[finite], s_ref[finite])
        metrics["kendall"] = kendall(s_out[finite], s_ref[finite])
    else:
        metrics["spearman"] = metrics["kendall"] = float("nan")
    metrics["top_k"] = top_k
    metrics["top_k_agreement"] = top_k_agreement(s_out, s_ref, top_k)
    return metrics


def label_spearman(outputs: np.ndarray, labels: np.ndarray | None, task: str, paired: bool) -> float | None:
    """Spearman of the model's scores against gold labels (STS-B), when there is one score per label."""
    if labels is None or (task == "embed" and not paired):
        return None
    scores = scalar_scores(outputs, task, paired)
    return spearman(scores, labels) if scores.shape == labels.shape else None


# --- tolerance ---------------------------------------------------------------------------------


def default_tolerance(calibration_error: float, dtype: str) -> float:
    """Twice the reference's own error against fp32, never below the dtype's floor."""
    floor = TOLERANCE_FLOOR.get(dtype, TOLERANCE_FLOOR["float32"])
    if not math.isfinite(calibration_error):
        return floor
    return max(2.0 * calibration_error, floor)


@dataclass
class Calibration:
    """The reference in `dtype` against the reference in fp32, on the same rows."""

    reference: str
    dtype: str
    error: float  # relative L2
    floor: float
    tolerance: float
    note: str = ""

    def to_dict(self) -> dict:
        return {"reference": self.reference, "dtype": self.dtype, "rel_l2_vs_fp32": self.error,
                "floor": self.floor, "tolerance": self.tolerance, "note": self.note}


def calibrate(reference_outputs: np.ndarray, fp32_outputs: np.ndarray | None, reference: str, dtype: str) -> Calibration:
    """The default tolerance from the reference's error in `dtype` against its fp32 run."""
    floor = TOLERANCE_FLOOR.get(dtype, TOLERANCE_FLOOR["float32"])
    if fp32_outputs is None:
        note = "the reference runs in float32: it is its own fp32 run, so the floor applies"
        return Calibration(reference, dtype, 0.0, floor, floor, note)
    error = relative_l2(reference_outputs, fp32_outputs)
    tolerance = default_tolerance(error, dtype)
    note = "2x the reference's error against fp32" if tolerance > floor else "the floor (2x the calibration error is below it)"
    return Calibration(reference, dtype, error, floor, tolerance, note)


# --- the run -----------------------------------------------------------------------------------


@dataclass
class ImplResult:
    impl: str
    actual: str
    metrics: dict
    within: bool
    label_spearman: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = {"impl": self.impl, "actual": self.actual, "within_tolerance": self.within, **self.metrics, "seconds": round(self.seconds, 3)}
        if self.label_spearman is not None:
            d["label_spearman"] = self.label_spearman
        return d


@dataclass
class ParityReport:
    model: dict
    gpu: dict
    task: str
    reference: str
    dtype: str
    rows: int
    texts: int
    skipped: int
    tolerance: float
    tolerance_source: str  # calibrated | given
    calibration: Calibration | None
    results: dict[str, ImplResult] = field(default_factory=dict)
    unavailable: dict[str, list[str]] = field(default_factory=dict)
    reference_label_spearman: float | None = None
    versions: dict = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        return [name for name, r in self.results.items() if not r.within]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "gpu": self.gpu,
            "task": self.task,
            "reference": self.reference,
            "dtype": self.dtype,
            "rows": self.rows,
            "texts": self.texts,
            "skipped": self.skipped,
            "tolerance": self.tolerance,
            "tolerance_source": self.tolerance_source,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "reference_label_spearman": self.reference_label_spearman,
            "results": {name: r.to_dict() for name, r in self.results.items()},
            "unavailable": self.unavailable,
            "passed": self.passed,
            "failures": self.failures,
            "versions": self.versions,
        }


def _free(loaded) -> None:
    import torch

    device = loaded.device
    loaded.model = None
    gc.collect()
    if getattr(device, "type", "") == "cuda":
        torch.cuda.empty_cache()


def run_parity(
    model: str,
    rows: TextRows,
    *,
    task: str = "embed",
    impls: list[str] | None = None,
    reference: str = "eager",
    dtype: str = "auto",
    device: str = "auto",
    tolerance: float | None = None,
    top_k: int = DEFAULT_TOP_K,
    batch_tokens: int | None = None,
    revision: str | None = None,
    auto_class: str | None = None,
    trust_remote_code: bool = False,
    allow_new_head: bool = False,
) -> ParityReport:
    """Each implementation's outputs against the reference's on the same rows (see the module doc).

    Every implementation runs the same batches: the scorer's token budget for the reference
    (`batch_tokens` overrides it).
    """
    if task not in TASKS:
        raise UnknownNameError("parity task", task, TASKS)
    reference = parse_impl(reference)
    impls = [parse_impl(i) for i in (impls or DEFAULT_PREFER)]
    impls = [i for i in dict.fromkeys(impls) if i != reference]
    if not impls:
        raise UsageError(f"no implementation to compare with the reference {reference}")
    if tolerance is not None and not (tolerance > 0):
        raise UsageError(f"--tolerance must be > 0, found {tolerance}")
    auto_class = auto_class or AUTO_CLASSES[task]
    inputs = inputs_for(rows, task)
    paired = task == "embed" and len(rows.columns) == 2
    job = score_job_for(model, task, len(inputs[0]) if inputs else 1, batch_tokens, revision, trust_remote_code)

    reasons, dtype_name = plan_reasons(model, [reference, *impls], dtype=parse_dtype(dtype), device=device,
                                       auto_class=auto_class, revision=revision, trust_remote_code=trust_remote_code)
    if reasons[reference]:
        raise UsageError(f"the reference {reference} cannot run here: " + "; ".join(reasons[reference]))

    def load(in_dtype: str):
        return load_model(model, revision=revision, auto_class=auto_class, dtype=in_dtype, device=device,
                          policy=Policy.strict([reference]), trust_remote_code=trust_remote_code, sink=NULL_SINK,
                          model_kwargs=model_kwargs_for(task, job), allow_new_head=allow_new_head, task=task)

    fp32_outputs = None
    if tolerance is None and dtype_name != "float32":
        loaded32 = load("float32")
        fp32_outputs = outputs_for(loaded32, inputs, job)
        _free(loaded32)

    loaded = load(dtype_name)
    ref_outputs = outputs_for(loaded, inputs, job)
    calibration = None
    if tolerance is None:
        calibration = calibrate(ref_outputs, fp32_outputs, reference, dtype_name)
        tolerance, source = calibration.tolerance, "calibrated"
    else:
        source = "given"

    decision = loaded.decision.to_dict()
    report = ParityReport(
        model=decision["model"], gpu=decision["gpu"], task=task, reference=reference, dtype=dtype_name,
        rows=rows.rows, texts=len(inputs), skipped=rows.skipped, tolerance=float(tolerance), tolerance_source=source,
        calibration=calibration, reference_label_spearman=label_spearman(ref_outputs, rows.labels, task, paired),
        versions=decision["versions"],
    )
    for impl in impls:
        if reasons.get(impl):
            report.unavailable[impl] = reasons[impl]
            continue
        actual, why = switch_to(loaded, impl)
        if why:
            report.unavailable[impl] = why
            continue
        t0 = time.perf_counter()
        try:
            out = outputs_for(loaded, inputs, job)
        except RuntimeError as e:  # out of memory, a kernel refusing a shape
            report.unavailable[impl] = [f"forward over the rows failed: {first_line(e)}"]
            continue
        metrics = compare(out, ref_outputs, task, paired=paired, top_k=top_k)
        within = bool(np.isfinite(out).all()) and metrics["rel_l2"] <= tolerance
        report.results[impl] = ImplResult(impl, actual, metrics, within, label_spearman(out, rows.labels, task, paired),
                                          time.perf_counter() - t0)
    _free(loaded)
    return report


def parity_event_fields(report: ParityReport) -> dict:
    """The fields of a `parity` event."""
    return report.to_dict()
