"""A sweep configuration (TOML): what to score, how many shards, where they run.

    run_id  = "stsb-42"            # optional; generated at the first run, kept by --resume
    output  = "runs/stsb"          # one directory per configuration inside, plus sweep.json
    events  = "runs/stsb/events"   # default: <output>/events
    shards  = 4
    devices = "auto"               # one worker per visible GPU; "cpu"; or [0, 1]
    workers = 2                    # CPU worker processes when there is no GPU
    merge   = true                 # the shards' outputs merged in input order per configuration

    model = "default"              # what every configuration scores, unless it says otherwise
    task  = "embed"
    input = "sentences.csv"
    text_column = "text"
    policy = "graceful"
    prefer = ["flash_attention_2", "sdpa", "eager"]

    [grid]                         # lists multiply: models x inputs x policies ...
    policy = ["graceful", "strict"]

    [[configs]]                    # or explicit configurations, each over the defaults above
    name = "minilm"
    model = "default"

Every configuration x shard is one job; each configuration has its own run id in the events
(the sweep's run id, suffixed with the configuration's name when there are several). Relative
paths are relative to the TOML file.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from attnfallback.errors import AttnFallbackError, ConfigError
from attnfallback.sharding import Shard
from attnfallback.task_names import TASKS

POLICIES = ("graceful", "strict", "fastest")
BAD_ROW = ("error", "skip")
NONFINITE = ("error", "flag")

# key -> (accepted Python types, description shown in errors)
JOB_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a local directory, a hub id or 'default'"),
    "revision": ((str,), "a hub revision"),
    "task": ((str,), " | ".join(TASKS)),
    "input": ((str,), "an input file (.jsonl, .csv, .tsv, each plain, .gz or .zst; .parquet, .arrow) or a saved dataset directory"),
    "text_column": ((str,), "a column name"),
    "text_columns": ((list, str), "a list of column names"),
    "id_column": ((str,), "a column name"),
    "policy": ((str,), " | ".join(POLICIES)),
    "prefer": ((list, str), "a list of attention implementations"),
    "dtype": ((str,), "auto | bfloat16 | float16 | float32"),
    "batch_tokens": ((int,), "a positive integer"),
    "max_length": ((int,), "a positive integer"),
    "on_bad_row": ((str,), " | ".join(BAD_ROW)),
    "on_nonfinite": ((str,), " | ".join(NONFINITE)),
    "trust_remote_code": ((bool,), "true | false"),
    "allow_new_head": ((bool,), "true | false (score with weights the checkpoint lacks, initialised at random)"),
    "part_rows": ((int,), "a positive integer (rows per committed part, the unit of --resume)"),
    "packing": ((str,), "auto | off (padding-free batches under flash implementations)"),
    "tokenizer_process": ((str,), "auto | off (on CUDA, tokenize in a child process)"),
    "measure": ((str,), "auto | on | off (time the viable implementations and keep the fastest)"),
    "shards": ((int,), "an integer >= 1"),
}
SWEEP_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "run_id": ((str,), "a run id"),
    "output": ((str,), "an output directory"),
    "events": ((str,), "an events directory"),
    "devices": ((str, list), '"auto", "cpu" or a list of GPU indices'),
    "workers": ((int,), "an integer >= 1"),
    "merge": ((bool,), "true | false"),
    "grid": ((dict,), "a table of lists"),
    "configs": ((list,), "an array of tables [[configs]]"),
}
CONFIG_KEYS = {"name": ((str,), "a short name"), **JOB_KEYS}

MANIFEST = "sweep.json"
# JobSpec keys added after the first manifests were written: recorded only when set, so that an
# older manifest compares equal to the same configuration and its sweep still resumes
LATER_KEYS = ("allow_new_head", "packing", "tokenizer_process", "measure")

# Set in the environment of every worker a sweep or the Ray engine starts (local processes, Ray
# actors), over what the parent has: NVLink multicast off in NCCL, PyTorch and NVSHMEM. The scorer
# uses no collectives; a program that does use multicast can put a shared host's GPUs out of
# service, so none of our workers may.
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class JobSpec:
    """What one configuration scores: the ScoreJob fields of the same names (`score_job`), less
    where each shard runs and writes; `name` and `shards` are the sweep's own."""

    name: str
    model: str = "default"
    input: str = ""
    task: str = "embed"
    revision: str | None = None
    text_column: str | None = None
    text_columns: tuple[str, ...] | None = None
    id_column: str | None = None
    policy: str = "graceful"
    prefer: tuple[str, ...] | None = None
    dtype: str = "auto"
    batch_tokens: int | None = None
    max_length: int | None = None
    on_bad_row: str = "error"
    on_nonfinite: str = "error"
    trust_remote_code: bool = False
    part_rows: int | None = None
    shards: int = 1
    allow_new_head: bool = False
    packing: str = "auto"
    tokenizer_process: str = "auto"
    measure: str | None = None  # None: the job's default ($ATTNFALLBACK_MEASURE, else auto)

    def to_dict(self) -> dict:
        """The configuration as the manifest records it (sweep.json; --resume compares it)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in LATER_KEYS:
            if d[k] == self.__dataclass_fields__[k].default:
                del d[k]  # only when set: a manifest written before the key existed still resumes
        for k in ("text_columns", "prefer"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    def score_job(self, run_id: str, shard: Shard | str | None, output: str | os.PathLike, events: str | os.PathLike,
                  device: str = "auto", resume: bool = False):
        """The ScoreJob of this configuration's `shard` (None: every row, which Ray's actors split):
        each field the two classes share, by name (a None here leaves the job's default), plus
        where it runs and writes; quiet (no progress bar)."""
        from dataclasses import fields

        from attnfallback.scoring.job import ScoreJob

        shared = {f.name for f in fields(ScoreJob)} & {f.name for f in fields(self)}
        values = {}
        for name in sorted(shared):
            value = getattr(self, name)
            if value is not None:
                values[name] = list(value) if isinstance(value, tuple) else value
        return ScoreJob(**values, output=str(output), shard=None if shard is None else str(shard), events=str(events),
                        run_id=run_id, device=device, resume=resume, quiet=True)


@dataclass(frozen=True)
class SweepJob:
    """One configuration x shard: runs as one `attnfallback score --job FILE` process (its shard I/N)."""

    spec: JobSpec
    run_id: str
    shard: Shard
    output: Path
    events: Path
    log: Path

    @property
    def key(self) -> str:
        return f"{self.spec.name}/{self.shard}"

    @property
    def job_file(self) -> Path:
        """Where the local engine writes this job's ScoreJob (`score --job`), beside its log."""
        return self.log.with_suffix(".job.json")

    @property
    def result_file(self) -> Path:
        """Where this job's process writes its result (`score --result`), beside its log."""
        return self.log.with_suffix(".result.json")

    def score_job(self, device: str = "auto", resume: bool = False):
        """The ScoreJob of this configuration x shard, on `device` (JobSpec.score_job)."""
        return self.spec.score_job(self.run_id, self.shard, self.output, self.events, device=device, resume=resume)

    def write_job_file(self, device: str = "auto", resume: bool = False) -> Path:
        """Write `score_job(device, resume)` to `job_file`, atomically; returns the file."""
        from attnfallback import atomic

        self.job_file.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.job_file, self.score_job(device, resume).to_dict(), indent=2)
        return self.job_file

    def score_args(self) -> list[str]:
        """The `attnfallback score` arguments (without the program name) that run this job from its
        job file (`write_job_file`) and write its result to `result_file`."""
        return ["score", "--job", str(self.job_file), "--result", str(self.result_file)]


@dataclass
class SweepConfig:
    """A parsed sweep: placement, locations, and one JobSpec per configuration."""

    path: Path | None
    output: Path
    events: Path
    specs: list[JobSpec]
    run_id: str | None = None
    devices: str | list[int] = "auto"
    workers: int | None = None
    merge: bool = True
    extra: dict = field(default_factory=dict)

    def run_id_of(self, spec: JobSpec, run_id: str) -> str:
        """The run id of one configuration: the sweep's, suffixed with the name when several."""
        return run_id if len(self.specs) == 1 else f"{run_id}.{spec.name}"

    def config_dir(self, spec: JobSpec) -> Path:
        return self.output / spec.name

    def jobs(self, run_id: str) -> list[SweepJob]:
        """Every configuration x shard, configuration by configuration."""
        out = []
        for spec in self.specs:
            directory = self.config_dir(spec)
            for i in range(spec.shards):
                shard = Shard(i, spec.shards)
                stem = f"{i}-of-{spec.shards}"
                out.append(SweepJob(spec, self.run_id_of(spec, run_id), shard,
                                    directory / "shards" / f"{stem}.parquet", self.events,
                                    directory / "logs" / f"{stem}.log"))
        return out

    def to_dict(self) -> dict:
        return {
            "path": None if self.path is None else str(self.path),
            "output": str(self.output),
            "events": str(self.events),
            "devices": self.devices,
            "workers": self.workers,
            "merge": self.merge,
            "configs": [s.to_dict() for s in self.specs],
        }


# --- parsing ----------------------------------------------------------------------------------

def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> SweepConfig:
    """Read and check a sweep TOML file; `overrides` replace top-level keys (e.g. from flags)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep configuration {path} not found", path=str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", path=str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e}", path=str(path)) from None
    data.update(overrides or {})
    return parse_config(data, base=path.parent, path=path)


def parse_config(data: Mapping[str, Any], base: str | os.PathLike = ".", path: str | os.PathLike | None = None) -> SweepConfig:
    """Check a sweep configuration given as a dict (a parsed TOML document)."""
    where = None if path is None else str(path)
    base = Path(base)
    data = dict(data)
    _check_keys(data, {**SWEEP_KEYS, **JOB_KEYS}, "the top level", where)

    grid = data.pop("grid", None) or {}
    configs = data.pop("configs", None) or []
    _check_keys(grid, JOB_KEYS, "[grid]", where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"[grid] {key} must be a non-empty list, found {values!r}", where, key)
        for v in values:
            _check_type(key, v, JOB_KEYS, where, "[grid]")
    for n, entry in enumerate(configs):
        if not isinstance(entry, dict):
            raise ConfigError(f"[[configs]] entry {n + 1} must be a table", where, "configs")
        _check_keys(entry, CONFIG_KEYS, f"[[configs]] entry {n + 1}", where)

    if "output" not in data:
        raise ConfigError("missing key 'output' (the sweep's output directory)", where, "output")
    output = _resolve(base, data["output"])
    events = _resolve(base, data["events"]) if "events" in data else output / "events"
    devices = _parse_devices(data.get("devices", "auto"), where)
    workers = data.get("workers")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, found {workers}", where, "workers")
    run_id = data.get("run_id")
    if run_id is not None and not run_id.strip():
        raise ConfigError("run_id must not be empty", where, "run_id")

    defaults = {k: v for k, v in data.items() if k in JOB_KEYS}
    entries = [dict(e) for e in configs] or [{}]
    grid_keys = list(grid)
    specs: list[JobSpec] = []
    for entry in entries:
        for combo in itertools.product(*(grid[k] for k in grid_keys)):
            varying = dict(zip(grid_keys, combo, strict=True))
            spec = _build_spec({**defaults, **entry, **varying}, varying, base, where)
            specs.append(replace(spec, name=_config_name(entry.get("name"), varying)))
    _check_names(specs, where)
    return SweepConfig(path=None if path is None else Path(path), output=output, events=events, specs=specs,
                       run_id=run_id, devices=devices, workers=workers, merge=data.get("merge", True))


def _check_keys(table: Mapping[str, Any], valid: Mapping[str, tuple], section: str, where: str | None) -> None:
    for key, value in table.items():
        if key not in valid:
            raise ConfigError(f"unknown key {key!r} in {section}; valid keys: {', '.join(sorted(valid))}", where, key)
        if section != "[grid]":  # grid values are lists, checked item by item
            _check_type(key, value, valid, where, section)


def _check_type(key: str, value: Any, valid: Mapping[str, tuple], where: str | None, section: str) -> None:
    kinds, description = valid[key]
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise ConfigError(f"{key} in {section} must be {description}, found {value!r}", where, key)


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _parse_devices(value: Any, where: str | None) -> str | list[int]:
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ConfigError(f'devices must be "auto", "cpu" or a list of GPU indices, found {value!r}', where, "devices")
        return list(value)
    text = str(value).strip().lower()
    if text in ("auto", "cpu"):
        return text
    if re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        return [int(v) for v in text.split(",")]
    raise ConfigError(f'devices must be "auto", "cpu" or a list of GPU indices, found {value!r}', where, "devices")


def _build_spec(fields: dict, varying: dict, base: Path, where: str | None) -> JobSpec:
    from attnfallback.policy import parse_dtype, parse_measure, parse_mode, parse_prefer
    from attnfallback.scoring.collate import PACKING_MODES
    from attnfallback.scoring.tokenizer_process import TOKENIZER_PROCESS_MODES

    def fail(key: str, message: str) -> ConfigError:
        label = fields.get("name") or ", ".join(f"{k}={v}" for k, v in varying.items()) or "the configuration"
        return ConfigError(f"{key} of {label}: {message}", where, key)

    if "input" not in fields:
        raise fail("input", "missing key 'input' (the file to score)")
    input_path = _resolve(base, fields["input"])
    if not input_path.exists():  # a file, or a directory written by datasets' save_to_disk
        raise fail("input", f"input file {input_path} not found")
    model = fields.get("model", "default")
    if model != "default" and (model.startswith((".", "~", "/")) or (base / model).is_dir()):
        model = str(_resolve(base, model))
    task = fields.get("task", "embed")
    if task not in TASKS:
        raise fail("task", f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    shards = fields.get("shards", 1)
    if shards < 1:
        raise fail("shards", f"the shard count must be >= 1, found {shards}")
    try:
        policy = parse_mode(fields.get("policy", "graceful")).value
        prefer = parse_prefer(fields["prefer"]) if "prefer" in fields else None
        dtype = parse_dtype(fields.get("dtype", "auto"))
    except AttnFallbackError as e:
        key = "policy" if "policy" in str(e) else "dtype" if "dtype" in str(e) else "prefer"
        raise fail(key, str(e)) from None
    # the first value of each is the default
    for key, allowed in (("on_bad_row", BAD_ROW), ("on_nonfinite", NONFINITE), ("packing", PACKING_MODES),
                         ("tokenizer_process", TOKENIZER_PROCESS_MODES)):
        if fields.get(key, allowed[0]) not in allowed:
            raise fail(key, f"unknown value {fields[key]!r}; valid: {', '.join(allowed)}")
    try:
        measure = parse_measure(fields["measure"]) if "measure" in fields else None
    except AttnFallbackError as e:
        raise fail("measure", str(e)) from None
    for key in ("batch_tokens", "max_length", "part_rows"):
        if key in fields and fields[key] < 1:
            raise fail(key, f"must be >= 1, found {fields[key]}")
    text_columns = fields.get("text_columns")
    if isinstance(text_columns, str):
        text_columns = [c.strip() for c in text_columns.split(",") if c.strip()]
    if text_columns is not None:
        if not text_columns or not all(isinstance(c, str) and c for c in text_columns):
            raise fail("text_columns", f"must be a non-empty list of column names, found {fields['text_columns']!r}")
        text_columns = tuple(text_columns)
    return JobSpec(
        name=fields.get("name") or "",
        model=model,
        input=str(input_path),
        task=task,
        revision=fields.get("revision"),
        text_column=fields.get("text_column"),
        text_columns=text_columns,
        id_column=fields.get("id_column"),
        policy=policy,
        prefer=prefer,
        dtype=dtype,
        batch_tokens=fields.get("batch_tokens"),
        max_length=fields.get("max_length"),
        on_bad_row=fields.get("on_bad_row", "error"),
        on_nonfinite=fields.get("on_nonfinite", "error"),
        trust_remote_code=fields.get("trust_remote_code", False),
        allow_new_head=fields.get("allow_new_head", False),
        part_rows=fields.get("part_rows"),
        shards=shards,
        packing=fields.get("packing", "auto"),
        tokenizer_process=fields.get("tokenizer_process", "auto"),
        measure=measure,
    )


def _config_name(explicit: str | None, varying: dict) -> str:
    """A path-safe name: the explicit one (suffixed with what the grid varies), else from the grid."""
    from attnfallback.events import safe_name

    parts = ([explicit] if explicit else []) + [_short(k, v) for k, v in varying.items()]
    return safe_name(".".join(parts) if parts else "main")


def _check_names(specs: list[JobSpec], where: str | None) -> None:
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"two configurations are both named {s.name!r}: give each [[configs]] its own name", where, "name")
        seen.add(s.name)


def _short(key: str, value: Any) -> str:
    """A short label for a grid value: a path's stem, a list joined."""
    if isinstance(value, list):
        value = "+".join(str(v) for v in value)
    text = str(value)
    if key in ("model", "input"):
        text = Path(text).stem or text
    return text
