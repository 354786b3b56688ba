"""Several GPUs of one host, run as a user runs them (issue 19): whole processes on one 100k-row job.

    python bench/multi_gpu.py --out bench/results/multi_gpu.json        # a host with 2+ GPUs
    python bench/multi_gpu.py --parts ray --out bench/results/multi_gpu.json   # a later call, Ray installed
    python bench/multi_gpu.py --device cpu --model DIR --rows 120 --part-rows 4  # degraded: a smoke run

Parts (--parts, run in this order; results are kept in --workdir, so a later call adds to an
earlier one's and reuses its model, input and reference):
- reference: `attnfallback score` on one GPU (CUDA_VISIBLE_DEVICES = the first), spawn to exit;
- sweep: `attnfallback sweep` with devices = "auto", one shard per GPU (CUDA_VISIBLE_DEVICES = the
  first --gpus GPUs): the GPU each shard's own attn_impl event names (host index, name, UUID), every
  row exactly once (ids compared), the merged output against the reference (max abs difference);
- ray: `attnfallback score --engine ray --actors auto`: one actor per GPU (num_gpus=1), the GPU and
  environment each actor reports, rows once, the output against the reference;
- resume: the sweep again in its own directory; shard 1/N (run by the second GPU's worker) is killed
  with SIGKILL once it has committed --kill-after-parts parts, then `attnfallback sweep --resume`:
  the killed shard continues from its committed parts; every row once; outputs as the reference's.
Throughput: the reference's wall time over the sweep's (and Ray's), whole processes, spawn to exit
(the issue's bar: >= 1.8 on 2 GPUs). Beside it, the reference's time outside its scoring loop (start,
load, finish), which bounds the ratio: with start-up s and loop w, N GPUs give at most (s+w)/(s+w/N),
so 1.8 on 2 GPUs needs w >= 8 s: the default job (BERT-base shape, 100k documents of ~350 tokens) is
sized for that; `bound_from_reference` in the output says what this job allows.

With fewer than 2 GPUs it runs degraded and says so: on one GPU both shards share it (devices =
[0, 0]), without one (or --device cpu) they are two CPU workers; the GPU checks and the throughput
bar do not apply. The child processes get the caller's environment minus the tokenizer settings a
plain shell lacks (TOKENIZERS_PARALLELISM, RAYON_NUM_THREADS), with NVLink multicast off. Prints a
table; writes JSON (--out); exits 1 when a check that applies fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "src"))

from zoo_models import MODELS, build_model, copy_tokenizer, json_tail, sentence_config, stsb_documents, write_input  # noqa: E402

from attnfallback.sweep.config import WORKER_ENV  # noqa: E402

PARTS = ("reference", "sweep", "ray", "resume")
TARGET_RATIO = 1.8
PLAIN_SHELL_UNSET = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


# --- the host ---------------------------------------------------------------------------------

def list_gpus(env: dict | None = None) -> list[dict]:
    """This process's GPUs, from `nvidia-smi` (index, name, UUID), in CUDA_VISIBLE_DEVICES' order
    when it is set; [] without nvidia-smi or GPUs."""
    env = os.environ if env is None else env
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index,name,uuid", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60, env=dict(env))
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    gpus = []
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 3 and fields[0].isdigit():
            gpus.append({"index": int(fields[0]), "name": ", ".join(fields[1:-1]), "uuid": fields[-1]})
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    chosen = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry or entry == "-1":
            break  # CUDA stops at the first entry it cannot use
        match = next((g for g in gpus if str(g["index"]) == entry or g["uuid"] == entry), None)
        if match is None:
            break
        chosen.append(match)
    return chosen


def plan_mode(device: str, gpus: list[dict], want: int) -> dict:
    """How the parts run here: several GPUs, or degraded (one GPU shared by two shards, or CPUs)."""
    if device == "cpu" or not gpus:
        why = "--device cpu" if device == "cpu" else "no GPU visible"
        return {"name": "cpu", "degraded": True, "gpus": [], "shards": 2, "device": "cpu",
                "note": f"degraded ({why}): two CPU workers; no GPU checks, the throughput ratio is not a GPU figure"}
    if len(gpus) < 2 or want < 2:
        return {"name": "one-gpu", "degraded": True, "gpus": gpus[:1], "shards": 2, "device": "cuda",
                "note": "degraded (one GPU): both shards share it; no GPU-placement checks, the throughput ratio "
                        "is not the multi-GPU figure"}
    chosen = gpus[:want]
    names = ", ".join(f"{g['index']} {g['name']}" for g in chosen)
    return {"name": f"{len(chosen)} GPUs", "degraded": False, "gpus": chosen, "shards": len(chosen), "device": "cuda",
            "note": f"{len(chosen)} GPUs of one host: {names}"}


def child_env(visible: str | None) -> dict:
    """A plain shell's environment with these GPUs visible (None: as the caller has them), the
    checkout's sources first, NVLink multicast off."""
    env = {k: v for k, v in os.environ.items() if k not in PLAIN_SHELL_UNSET}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    elif "CUDA_VISIBLE_DEVICES" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    env.update(WORKER_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


# --- the job ----------------------------------------------------------------------------------

def build_bert_base(directory: Path) -> Path:
    """A random-weight BERT-base shape (12 layers, hidden 768, 12 heads) with the MiniLM tokenizer and
    a mean-pooling sentence-transformers config; built on the CPU (this process makes no CUDA context:
    the GPUs are the runs')."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    copy_tokenizer(directory)
    sentence_config(directory, 768)
    return directory


def prepare_model(name: str, workdir: Path) -> str:
    if name == "default" or Path(name).is_dir():
        return name if name == "default" else str(Path(name).resolve())
    if name != "bert-base-random" and name not in MODELS:
        sys.exit(f"--model {name}: not a directory, 'default', 'bert-base-random' or one of {', '.join(MODELS)}")
    if name in MODELS and MODELS[name] != "embed":
        sys.exit(f"--model {name}: this bench scores embeddings (task embed); {name} is a {MODELS[name]} model")
    directory = workdir / "models" / name
    if not (directory / "config.json").is_file():  # built aside, then renamed: never half a model
        partial = directory.with_name(f"{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)
        build_bert_base(partial) if name == "bert-base-random" else build_model(name, partial, device="cpu")
        os.replace(partial, directory)
    return str(directory)


def prepare_input(workdir: Path, rows: int, mean_sentences: float, seed: int) -> Path:
    path = workdir / f"input-{rows}-{mean_sentences:g}-{seed}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        write_input(tmp, stsb_documents(rows, mean_sentences, seed=seed), "embed")
        os.replace(tmp, path)
    return path


# --- running ----------------------------------------------------------------------------------

def attnfallback(*args: str) -> list[str]:
    return [sys.executable, "-m", "attnfallback.cli.app", *args]


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C first (a sweep passes it on to its jobs, which run in sessions of their own), then kill."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def communicate(proc: subprocess.Popen, timeout: float) -> bytes:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        stop(proc)
        raise


def run_timed(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[float, int, dict | None]:
    """(wall seconds spawn to exit, exit code, the --json it printed); stderr to `log`."""
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        err.write(f"--- {' '.join(cmd[2:])}\n".encode())
        err.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
        stdout = communicate(proc, timeout)
    return time.perf_counter() - t0, proc.returncode, json_tail(stdout.decode("utf-8", "replace"))


def score_args(args, model: str, data: Path, device: str) -> list[str]:
    extra = ["--prefer", args.prefer, "--device", device, "--json", "--quiet"]
    if args.max_length:
        extra += ["--max-length", str(args.max_length)]
    return ["score", model, "--input", str(data), "--task", "embed", *extra]


def write_sweep_config(path: Path, args, model: str, data: Path, mode: dict, run_id: str) -> Path:
    devices = {"cpu": '"cpu"', "one-gpu": None}.get(mode["name"], '"auto"')
    if devices is None:  # two shards on the one GPU
        devices = json.dumps([mode["gpus"][0]["index"]] * mode["shards"])
    lines = [f"run_id = {json.dumps(run_id)}", f"output = {json.dumps(str(path.parent / 'out'))}",
             f"shards = {mode['shards']}", f"devices = {devices}", f"model = {json.dumps(model)}", 'task = "embed"',
             f"input = {json.dumps(str(data))}", f"prefer = {json.dumps(args.prefer.split(','))}"]
    if mode["name"] == "cpu":
        lines.append(f"workers = {mode['shards']}")
    if args.part_rows:
        lines.append(f"part_rows = {args.part_rows}")
    if args.max_length:
        lines.append(f"max_length = {args.max_length}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def visible_for(mode: dict, count: int | None = None) -> str | None:
    if mode["name"] == "cpu":
        return None
    gpus = mode["gpus"][:count] if count else mode["gpus"]
    return ",".join(str(g["index"]) for g in gpus)


# --- what came out ----------------------------------------------------------------------------

def read_embeddings(path: Path):
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "embedding"])
    return table.column("id").to_pylist(), np.asarray(table.column("embedding").to_pylist(), dtype=np.float64)


def compare(path: Path, reference: Path, input_ids: list[str]) -> dict:
    """Rows once (ids against the input's), and values against the reference's, row by row."""
    import numpy as np

    ids, values = read_embeddings(path)
    ref_ids, ref_values = read_embeddings(reference)
    position = {v: i for i, v in enumerate(ref_ids)}
    # every input row present, none twice, none foreign
    once = len(ids) == len(set(ids)) == len(input_ids) and set(ids) == set(input_ids)
    out = {"rows": len(ids), "distinct_ids": len(set(ids)), "input_rows": len(input_ids), "rows_once": once,
           "ids_in_input_order": ids == input_ids}
    if ids and all(i in position for i in ids):
        aligned = ref_values[[position[i] for i in ids]]
        diff = np.abs(values - aligned)
        cos = (values * aligned).sum(1) / (np.linalg.norm(values, axis=1) * np.linalg.norm(aligned, axis=1) + 1e-30)
        out.update(max_abs_diff=float(diff.max()), max_abs_value=float(np.abs(aligned).max()),
                   identical_rows=int((diff.max(1) == 0).sum()), min_cosine=float(cos.min()))
    return out


def read_events(events: Path, run_id: str) -> dict[str, list[dict]]:
    """Per shard, its attn_impl and shard_done records in the order written (JSONL, no DuckDB)."""
    from attnfallback.events import safe_name

    out: dict[str, list[dict]] = {}
    for file in sorted((events / safe_name(run_id)).glob("*.jsonl")):
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("run_id") == run_id and record.get("event") in ("attn_impl", "shard_done"):
                out.setdefault(record["shard"], []).append(record)
    for records in out.values():
        records.sort(key=lambda r: r.get("ts", ""))
    return out


def shard_gpus(events: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for shard in sorted(events, key=lambda s: int(s.split("/")[0]) if s.split("/")[0].isdigit() else -1):
        for r in events[shard]:
            if r["event"] == "attn_impl":
                gpu = r.get("gpu") or {}
                rows.append({"shard": shard, "pid": r.get("pid"), "gpu_index": gpu.get("index"), "gpu_name": gpu.get("name"),
                             "gpu_uuid": gpu.get("uuid"), "gpu_class": gpu.get("class"), "used": r.get("used")})
    return rows


# --- the parts --------------------------------------------------------------------------------

def part_reference(args, ctx) -> dict:
    run = ctx["workdir"] / "reference"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    output = run / "scores.parquet"
    cmd = attnfallback(*score_args(args, ctx["model"], ctx["input"], ctx["mode"]["device"]), "--output", str(output),
                       "--events", str(run / "events"), "--run-id", "mg-reference")
    wall, code, report = run_timed(cmd, child_env(visible_for(ctx["mode"], 1)), args.timeout, ctx["log"])
    out = {"command": " ".join(cmd[2:]), "exit": code, "wall_s": round(wall, 3), "output": str(output)}
    if code != 0 or report is None:
        return {**out, "error": f"exit {code}; see {ctx['log']}"}
    phases = report.get("phases") or {}
    loop = phases.get("score_s")
    decision = report.get("decision") or {}
    out.update(rows=report.get("rows_written"), tokens=report.get("tokens"), loop_s=loop, dtype=(decision.get("model") or {}).get("dtype"),
               outside_loop_s=None if loop is None else round(wall - loop, 3), gpu=(report.get("decision") or {}).get("gpu"),
               used=(report.get("decision") or {}).get("used"), tokens_per_s_whole=round(report["tokens"] / wall, 1))
    return out


def part_sweep(args, ctx) -> dict:
    run = ctx["workdir"] / "sweep"
    shutil.rmtree(run, ignore_errors=True)
    config = write_sweep_config(run / "sweep.toml", args, ctx["model"], ctx["input"], ctx["mode"], "mg-sweep")
    cmd = attnfallback("sweep", str(config), "--json")
    wall, code, report = run_timed(cmd, child_env(visible_for(ctx["mode"])), args.timeout, ctx["log"])
    out = {"command": " ".join(cmd[2:]), "config": config.read_text(), "exit": code, "wall_s": round(wall, 3)}
    if report is None:
        return {**out, "error": f"exit {code}, no report; see {ctx['log']}"}
    jobs = [{"shard": j["shard"], "worker": j["worker"], "status": j["status"], "seconds": j["seconds"],
             "rows": (j.get("score") or {}).get("rows_written"), "gpu": ((j.get("score") or {}).get("decision") or {}).get("gpu"),
             "error": j.get("error")} for j in report["jobs"]]
    out.update(jobs=jobs, shards=shard_gpus(read_events(run / "out" / "events", "mg-sweep")))
    merged = (report.get("merged") or {}).get("main")
    if merged:
        out["merged"] = merged["path"]
        out["compare"] = compare(Path(merged["path"]), Path(ctx["reference_output"]), ctx["input_ids"])
    tokens = sum((j.get("score") or {}).get("tokens") or 0 for j in report["jobs"])
    out["tokens"] = tokens
    out["tokens_per_s_whole"] = round(tokens / wall, 1) if wall else None
    return out


def part_ray(args, ctx) -> dict:
    if importlib.util.find_spec("ray") is None:
        return {"skipped": "ray is not installed here (bench/multi_gpu.sh kit brings it to a GPU host)"}
    run = ctx["workdir"] / "ray"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    output = run / "scores.parquet"
    actors = "auto" if ctx["mode"]["name"] != "cpu" else str(ctx["mode"]["shards"])
    cmd = attnfallback(*score_args(args, ctx["model"], ctx["input"], ctx["mode"]["device"]), "--output", str(output),
                       "--engine", "ray", "--actors", actors, "--events", str(run / "events"), "--run-id", "mg-ray")
    wall, code, report = run_timed(cmd, child_env(visible_for(ctx["mode"])), args.timeout, ctx["log"])
    out = {"command": " ".join(cmd[2:]), "exit": code, "wall_s": round(wall, 3)}
    if code != 0 or report is None:
        return {**out, "error": f"exit {code}; see {ctx['log']}"}
    out["actors"] = [{"shard": a["shard"], "pid": a.get("pid"), "rows_in": a.get("rows_in"), "rows_written": a.get("rows_written"),
                      "busy_s": a.get("busy_s"), "gpu": a.get("gpu"), "env": a.get("env"), "used": a.get("used")}
                     for a in (report.get("task") or {}).get("actors", [])]
    out["shards"] = shard_gpus(read_events(run / "events", "mg-ray"))
    out["tokens"] = report.get("tokens")
    out["tokens_per_s_whole"] = round(report["tokens"] / wall, 1) if report.get("tokens") else None
    out["compare"] = compare(output, Path(ctx["reference_output"]), ctx["input_ids"])
    return out


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            pids.append(int(entry))
    return pids


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def shard_of(args: list[str]) -> str | None:
    """The shard a `score` command line runs: its --shard, else the shard of its --job file (a
    sweep's shards run from job files)."""
    for flag in ("--shard", "--job"):
        if flag in args[:-1]:
            value = args[args.index(flag) + 1]
            if flag == "--shard":
                return value
            try:
                return json.loads(Path(value).read_text(encoding="utf-8")).get("shard")
            except (OSError, ValueError, AttributeError):
                return None
    return None


def committed(output: Path) -> tuple[int, int]:
    """(parts, rows) committed so far at a shard's output (its parts manifest)."""
    manifest = output.parent / f".{output.name}.parts" / "manifest.json"
    try:
        parts = json.loads(manifest.read_text())["parts"]
    except (OSError, ValueError, KeyError):
        return 0, 0
    return len(parts), sum(p.get("rows", 0) for p in parts)


def kill_when_committed(sweep: subprocess.Popen, shard: str, output: Path, after_parts: int, found: dict) -> None:
    """Find the `score` process of `shard` among the sweep's children; SIGKILL its process group once
    `after_parts` parts are committed (the job runs in its own session: its tokenizer child too)."""
    victim = None
    while sweep.poll() is None:
        if victim is None:
            for pid in child_pids(sweep.pid):
                if shard_of(cmdline(pid)) == shard:
                    victim = pid
                    found["pid"] = pid
        elif committed(output)[0] >= after_parts:
            found["parts"], found["rows"] = committed(output)
            try:
                os.killpg(victim, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                os.kill(victim, signal.SIGKILL)
            found["killed_at_s"] = round(time.perf_counter() - found["t0"], 3)
            return
        time.sleep(0.003)


def part_resume(args, ctx) -> dict:
    mode = ctx["mode"]
    run = ctx["workdir"] / "resume"
    shutil.rmtree(run, ignore_errors=True)
    config = write_sweep_config(run / "sweep.toml", args, ctx["model"], ctx["input"], mode, "mg-resume")
    n = mode["shards"]
    shard = f"1/{n}"
    output = run / "out" / "main" / "shards" / f"1-of-{n}.parquet"
    env = child_env(visible_for(mode))
    found = {"t0": time.perf_counter()}
    with open(ctx["log"], "ab") as err:
        err.write(f"--- sweep {config} (shard {shard} to be killed)\n".encode())
        err.flush()
        sweep = subprocess.Popen(attnfallback("sweep", str(config), "--json"), env=env, stdout=subprocess.PIPE, stderr=err)
        watcher = threading.Thread(target=kill_when_committed, args=(sweep, shard, output, args.kill_after_parts, found),
                                   daemon=True)
        watcher.start()
        stdout = communicate(sweep, args.timeout)
        watcher.join(5)
    first = json_tail(stdout.decode("utf-8", "replace")) or {}
    by_shard = {j["shard"]: j for j in first.get("jobs", [])}
    killed = by_shard.get(shard, {})
    out = {"config": config.read_text(), "killed_shard": shard, "killed_pid": found.get("pid"),
           "killed": "killed_at_s" in found, "parts_committed_at_kill": found.get("parts"),
           "rows_committed_at_kill": found.get("rows"), "first_exit": sweep.returncode,
           "killed_job": {k: killed.get(k) for k in ("worker", "status", "exit_code", "error")},
           "other_jobs": {s: j["status"] for s, j in by_shard.items() if s != shard}}
    wall, code, report = run_timed(attnfallback("sweep", str(config), "--resume", "--json"), env, args.timeout, ctx["log"])
    out.update(resume_exit=code, resume_wall_s=round(wall, 3))
    if report is None:
        return {**out, "error": f"resume: exit {code}, no report; see {ctx['log']}"}
    jobs = {j["shard"]: j for j in report["jobs"]}
    resumed = jobs.get(shard, {})
    out["resumed_job"] = {"worker": resumed.get("worker"), "status": resumed.get("status"),
                          "resumed_parts": (resumed.get("score") or {}).get("resumed_parts"),
                          "rows_written": (resumed.get("score") or {}).get("rows_written")}
    out["statuses"] = {s: j["status"] for s, j in jobs.items()}
    out["shards"] = shard_gpus(read_events(run / "out" / "events", "mg-resume"))
    # each shard's own file holds exactly the rows it owns (row r in shard r mod N), once
    ids = ctx["input_ids"]
    out["shard_rows"] = {}
    for s, j in sorted(jobs.items()):
        index = int(s.split("/")[0])
        got = read_embeddings(Path(j["output"]))[0] if Path(j["output"]).exists() else []
        out["shard_rows"][s] = {"rows": len(got), "owned": len(ids[index::n]), "exact": got == ids[index::n]}
    merged = (report.get("merged") or {}).get("main")
    if merged:
        out["compare"] = compare(Path(merged["path"]), Path(ctx["reference_output"]), ids)
    return out


# --- the verdict ------------------------------------------------------------------------------

def check(checks: list, name: str, ok, detail: str = "") -> None:
    checks.append({"check": name, "ok": ok, "detail": detail})


def tolerance_for(comparison: dict, dtype: str | None, override: float | None) -> tuple[float | None, str]:
    """The max abs difference allowed against the reference: other batch compositions round
    differently; float32 as the tests allow, half precision two units in the last place at the
    output's largest magnitude."""
    if override is not None:
        return override, "--tolerance"
    if dtype in ("bfloat16", "float16"):
        spacing = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10  # between 1.0 and the next value
        scale = max(1.0, comparison.get("max_abs_value") or 1.0)
        return 2 * spacing * scale, f"2 {dtype} ulps at the largest value, {scale:.3g}"
    return 1e-5, "float32 rounding"


def values_check(checks: list, name: str, comparison: dict | None, dtype: str | None, override: float | None) -> None:
    comparison = comparison or {}
    if "max_abs_diff" not in comparison:
        check(checks, name, False, "no values to compare (rows missing or foreign)")
        return
    tolerance, why = tolerance_for(comparison, dtype, override)
    check(checks, name, comparison["max_abs_diff"] <= tolerance,
          f"max abs diff {comparison['max_abs_diff']:.3g} (tolerance {tolerance:.3g}: {why}); min cosine "
          f"{comparison['min_cosine']:.6f}; {comparison['identical_rows']} of {comparison['rows']} rows identical")


def verdict(results: dict, mode: dict, override: float | None, gpus: int) -> list[dict]:
    checks: list[dict] = []
    ref, sweep, ray, resume = (results.get(p) for p in PARTS)
    dtype = (ref or {}).get("dtype")
    multi = not mode["degraded"]
    if ref:
        check(checks, "reference: 1 process scored every row", ref.get("exit") == 0 and ref.get("rows") == results["rows"],
              f"exit {ref.get('exit')}, {ref.get('rows')} of {results['rows']} rows")
    if sweep:
        cmp = sweep.get("compare") or {}
        check(checks, "sweep: every shard completed", sweep.get("exit") == 0, f"exit {sweep.get('exit')}")
        check(checks, "sweep: rows exactly once, ids in input order", bool(cmp.get("rows_once") and cmp.get("ids_in_input_order")),
              f"{cmp.get('rows')} rows, {cmp.get('distinct_ids')} distinct of {cmp.get('input_rows')}")
        values_check(checks, "sweep: outputs equal the reference's", cmp, dtype, override)
        shards = sweep.get("shards") or []
        check(checks, "sweep: every shard's attn_impl event names its GPU",
              bool(shards) and len(shards) == mode["shards"] and all(s["gpu_name"] for s in shards),
              "; ".join(f"{s['shard']}: {s['gpu_index']} {s['gpu_name']} {s['gpu_uuid']}" for s in shards))
        if multi:
            uuids = {s["gpu_uuid"] for s in shards}
            expected = {g["uuid"] for g in mode["gpus"]}
            check(checks, "sweep: one shard per GPU (distinct UUIDs, those of the GPUs used)", uuids == expected and len(shards) == gpus,
                  f"shards on {sorted(uuids, key=str)}; GPUs {sorted(expected)}")
            workers = {j["worker"]: j["gpu"] and j["gpu"].get("index") for j in sweep.get("jobs", [])}
            check(checks, "sweep: each worker's GPU is the one its event names",
                  all(w == f"gpu{i}" for w, i in workers.items()), json.dumps(workers))
    if ray and "skipped" not in ray:
        cmp = ray.get("compare") or {}
        actors = ray.get("actors") or []
        check(checks, "ray: the job completed", ray.get("exit") == 0, f"exit {ray.get('exit')}")
        check(checks, "ray: rows exactly once, ids in input order", bool(cmp.get("rows_once") and cmp.get("ids_in_input_order")),
              f"{cmp.get('rows')} rows; actors' rows in {[a['rows_in'] for a in actors]}")
        values_check(checks, "ray: outputs equal the reference's", cmp, dtype, override)
        check(checks, "ray: every actor's process has NVLink multicast off",
              bool(actors) and all({k: (a.get("env") or {}).get(k) for k in WORKER_ENV} == WORKER_ENV for a in actors),
              json.dumps([a.get("env") for a in actors]))
        if multi:
            uuids = [(a.get("gpu") or {}).get("uuid") for a in actors]
            check(checks, "ray: one actor per GPU, each with one GPU of its own",
                  len(actors) == gpus and len(set(uuids)) == gpus and None not in uuids
                  and all(len(((a.get("env") or {}).get("CUDA_VISIBLE_DEVICES") or "").split(",")) == 1 for a in actors),
                  "; ".join(f"{a['shard']}: CUDA_VISIBLE_DEVICES={(a.get('env') or {}).get('CUDA_VISIBLE_DEVICES')} "
                            f"{(a.get('gpu') or {}).get('uuid')}" for a in actors))
    if resume:
        cmp = resume.get("compare") or {}
        check(checks, f"resume: shard {resume['killed_shard']} killed after a committed part", resume.get("killed") and
              (resume.get("killed_job") or {}).get("status") == "failed" and resume.get("first_exit") == 1,
              f"pid {resume.get('killed_pid')}, {resume.get('parts_committed_at_kill')} parts / "
              f"{resume.get('rows_committed_at_kill')} rows committed, job {resume.get('killed_job')}")
        rj = resume.get("resumed_job") or {}
        check(checks, "resume: the killed shard continued from its committed parts",
              resume.get("resume_exit") == 0 and rj.get("status") == "done" and (rj.get("resumed_parts") or 0) >= 1,
              f"exit {resume.get('resume_exit')}, {rj}")
        rows = resume.get("shard_rows") or {}
        check(checks, "resume: nothing lost (each shard exactly its rows; merged rows once, in order)",
              bool(rows) and all(r["exact"] for r in rows.values()) and bool(cmp.get("rows_once") and cmp.get("ids_in_input_order")),
              f"{json.dumps(rows)}; merged {cmp.get('rows')} of {cmp.get('input_rows')}")
        values_check(checks, "resume: outputs equal the reference's", cmp, dtype, override)
    ratio = (results.get("throughput") or {}).get("sweep_over_reference")
    if ratio is not None:
        check(checks, f"throughput: {gpus} GPUs >= {TARGET_RATIO}x one GPU (sweep, whole process)",
              ratio >= TARGET_RATIO if multi else None, f"{ratio:.2f}x" + ("" if multi else " (degraded: not a GPU figure)"))
    return checks


def throughput(results: dict) -> dict:
    ref = results.get("reference") or {}
    out = {"target": TARGET_RATIO}
    for part in ("sweep", "ray"):
        other = results.get(part) or {}
        if ref.get("wall_s") and other.get("wall_s") and other.get("exit") == 0:
            out[f"{part}_over_reference"] = round(ref["wall_s"] / other["wall_s"], 3)
    n = results["mode"]["shards"]
    if ref.get("outside_loop_s") is not None and ref.get("loop_s"):
        s, w = ref["outside_loop_s"], ref["loop_s"]
        out["bound_from_reference"] = round((s + w) / (s + w / n), 3)  # start-up and finish stay, the loop splits
    return out


# --- report -----------------------------------------------------------------------------------

def table(rows: list[list], header: list[str]) -> list[str]:
    grid = [header] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(header))]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in grid]


def report(results: dict) -> list[str]:
    mode = results["mode"]
    lines = [f"multi_gpu: {mode['note']}", f"job: {results['rows']} rows, model {results['model_name']}, prefer "
             f"{results['prefer']}, host {results['host']}"]
    if mode["degraded"]:
        lines.append("DEGRADED MODE: the figures below are a smoke run, not the issue's multi-GPU measurement")
    runs = []
    for part in ("reference", "sweep", "ray"):
        r = results.get(part)
        if r and "skipped" not in r:
            runs.append([part, r.get("exit"), r.get("wall_s"), r.get("tokens"), r.get("tokens_per_s_whole"),
                         (r.get("compare") or {}).get("max_abs_diff")])
        elif r:
            runs.append([part, "skipped", None, None, None, r["skipped"]])
    if runs:
        lines += [""] + table(runs, ["run", "exit", "wall s", "tokens", "tokens/s (whole)", "max abs diff vs ref"])
    placed = []
    for part in ("sweep", "ray", "resume"):
        for s in (results.get(part) or {}).get("shards") or []:
            placed.append([part, s["shard"], s["pid"], s["gpu_index"], s["gpu_name"], s["gpu_uuid"], s["used"]])
    if placed:
        lines += [""] + table(placed, ["run", "shard", "pid", "gpu index", "gpu name", "gpu uuid", "used"])
    t = results.get("throughput") or {}
    if t:
        lines += ["", "throughput (reference wall / run wall): " + ", ".join(f"{k} {v}" for k, v in t.items())]
    r = results.get("resume")
    if r:
        lines += ["", f"kill and resume: shard {r['killed_shard']} (pid {r.get('killed_pid')}, "
                      f"{(r.get('killed_job') or {}).get('worker')}) killed with {r.get('parts_committed_at_kill')} parts / "
                      f"{r.get('rows_committed_at_kill')} rows committed; resumed on {(r.get('resumed_job') or {}).get('worker')} "
                      f"after {(r.get('resumed_job') or {}).get('resumed_parts')} parts; shards: "
                      + ", ".join(f"{s} {v['rows']}/{v['owned']}{'' if v['exact'] else ' WRONG'}"
                                  for s, v in (r.get("shard_rows") or {}).items())]
    lines += [""] + table([[c["check"], {True: "ok", False: "FAILED", None: "n/a"}[c["ok"]], c["detail"][:150]]
                           for c in results["checks"]], ["check", "result", "detail"])
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="reference,sweep,ray,resume", help="reference, sweep, ray, resume (comma-separated)")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--mean-sentences", type=float, default=32.0,
                   help="STS-B sentences per document (geometric mean; 32: ~350 tokens, the longest cut at 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="bert-base-random",
                   help=f"bert-base-random, a directory, 'default', or one of {', '.join(k for k, v in MODELS.items() if v == 'embed')}")
    p.add_argument("--prefer", default="sdpa", help="the attention preference of every run (one implementation: the "
                                                   "same kernels, so outputs compare)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu"))
    p.add_argument("--gpus", type=int, default=2, help="GPUs for the multi-GPU runs (the first ones visible)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--part-rows", type=int, default=None, help="rows per committed part in the sweeps (default score's)")
    p.add_argument("--kill-after-parts", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=None, help="max abs difference allowed against the reference "
                                                                "(default: 1e-5 in float32; in bf16/fp16 two units in the "
                                                                "last place at the output's largest value)")
    p.add_argument("--timeout", type=float, default=540.0, help="seconds per process")
    p.add_argument("--workdir", default="/tmp/multi_gpu")
    p.add_argument("--fresh", action="store_true", help="forget the results an earlier call left in --workdir")
    p.add_argument("--out", default=None, help="JSON results (also kept in --workdir/results.json)")
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; known: {', '.join(PARTS)}")

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    gpus = [] if args.device == "cpu" else list_gpus()
    mode = plan_mode(args.device, gpus, args.gpus)
    settings = {"rows": args.rows, "mean_sentences": args.mean_sentences, "seed": args.seed, "model_name": args.model,
                "prefer": args.prefer, "max_length": args.max_length, "mode": mode}
    state_path = workdir / "results.json"
    results = json.loads(state_path.read_text()) if state_path.is_file() and not args.fresh else {}
    if {k: results.get(k) for k in settings} != settings:
        results = {}  # another job or another host: start over
    results.update(settings, host=socket.gethostname())
    log = workdir / "processes.log"
    print(f"multi_gpu: {mode['note']}", flush=True)

    model = prepare_model(args.model, workdir)
    data = prepare_input(workdir, args.rows, args.mean_sentences, args.seed)
    input_ids = [json.loads(line)["id"] for line in data.read_text(encoding="utf-8").splitlines()]
    ctx = {"workdir": workdir, "model": model, "input": data, "input_ids": input_ids, "mode": mode, "log": log}
    ref = results.get("reference") or {}
    if parts and "reference" not in parts and not (ref.get("exit") == 0 and Path(ref.get("output", "")).is_file()):
        parts.insert(0, "reference")  # the others compare with it
    runners = {"reference": part_reference, "sweep": part_sweep, "ray": part_ray, "resume": part_resume}
    for part in PARTS:
        if part not in parts:
            continue
        print(f"=== {part} ({time.strftime('%H:%M:%S')})", flush=True)
        if part != "reference" and not (results.get("reference") or {}).get("exit") == 0:
            results[part] = {"error": "no reference run to compare with"}
            continue
        ctx["reference_output"] = (results.get("reference") or {}).get("output")
        try:
            results[part] = runners[part](args, ctx)
        except subprocess.TimeoutExpired as e:
            results[part] = {"error": f"timed out after {e.timeout} s"}
        print(json.dumps({k: v for k, v in results[part].items() if k not in ("config", "shards", "jobs", "actors")}), flush=True)
        state_path.write_text(json.dumps(results, indent=2, default=str))
    results["throughput"] = throughput(results)
    results["checks"] = verdict(results, mode, args.tolerance, mode["shards"])
    results["ok"] = all(c["ok"] is not False for c in results["checks"])
    state_path.write_text(json.dumps(results, indent=2, default=str))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(report(results)))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
