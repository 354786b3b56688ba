"""`attnfallback sweep CONFIG.toml`: every configuration x shard of a sweep, locally or on Ray."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from attnfallback.cli.common import JSON, print_json, stderr_console, stdout_console


def run_sweep(config_path: str, resume: bool = False, engine: str = "local", address: str | None = None,
              echo=None):
    """Run the sweep a TOML file describes; returns the SweepResult (failed shards included)."""
    from attnfallback.sweep.config import load_config
    from attnfallback.sweep.engines import check_engine, run_sweep_engine

    check_engine(engine, address)  # before anything is read or written: exit 2 with the install line for Ray
    return run_sweep_engine(load_config(config_path), engine, resume=resume, address=address, echo=echo)


def format_table(rows: list[dict], columns: list[str], headers: dict[str, str] | None = None) -> list[str]:
    """Rows as aligned text lines (the first line is the header)."""
    headers = headers or {}

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    grid = [[headers.get(c, c) for c in columns]] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in grid]


def shard_rows(result) -> list[dict]:
    """One row per job: the events' view of how it loaded (else the job's own report), and its exit."""
    by_key = {(s["run_id"], s["shard"]): s for s in result.shards}
    rows = []
    for job in result.jobs:
        s = by_key.get((job.run_id, job.shard)) or _from_job_report(job)
        reason = None
        if s.get("reason"):
            reason = f"{s['failed_impl']}: {s['reason']}" if s.get("failed_impl") else s["reason"]
        elif not job.ok:
            reason = job.error
        status = "ok" if job.ok else ("strict failure" if s.get("strict_failure") else f"failed ({_exit_text(job.exit_code)})")
        report = job.score or {}
        written = report.get("rows_written", s.get("rows"))
        skipped = report.get("rows_skipped", s.get("skipped"))
        rows.append({"config": job.config, "shard": job.shard, "gpu": s.get("gpu_class"),
                     "requested": s.get("requested"), "used": s.get("used"), "fell_back": s.get("fell_back"),
                     "status": status, "rows": written, "skipped": skipped if written is not None else None,
                     "seconds": job.seconds, "reason": reason})
    return rows


def skipped_lines(result, limit: int = 20) -> list[str]:
    """One line per shard that skipped rows: which input lines, as `score` lists them."""
    lines = []
    several = len({j.config for j in result.jobs}) > 1
    for job in result.jobs:
        report = job.score or {}
        count = report.get("rows_skipped") or 0
        if not count:
            continue
        listed = [str(s["line"]) for s in (report.get("skipped") or [])[:limit] if s.get("line") is not None]
        name = f"{job.config} {job.shard}" if several else job.shard
        shown = ", ".join(listed) if listed else "not listed"
        more = f" and {count - len(listed)} more" if listed and count > len(listed) else ""
        lines.append(f"  {name}: {count} row(s) skipped, lines {shown}{more}")
    return lines


def _from_job_report(job) -> dict:
    """What a shard's own `score --json` report says, where the events cannot be queried."""
    score = job.score or {}
    decision = score.get("decision") or {}
    if not decision:
        return {}
    failed = next((a for a in decision.get("attempts", []) if not a.get("ok") and a.get("reasons")), None)
    return {"gpu_class": (decision.get("gpu") or {}).get("class"), "requested": decision.get("requested"),
            "used": decision.get("used"), "fell_back": decision.get("fell_back"),
            "failed_impl": failed["impl"] if failed and decision.get("fell_back") else None,
            "reason": failed["reasons"][0] if failed and decision.get("fell_back") else None,
            "rows": score.get("rows_written", score.get("rows_in")), "skipped": score.get("rows_skipped")}


def _exit_text(code) -> str:
    from attnfallback.sweep.local import describe_exit

    return describe_exit(code)


def render_sweep(result, console=None, resume_command: str | None = None) -> None:
    """The end-of-sweep report: every shard, the events summary, failures, outputs; and, when shards
    failed and the sweep can be resumed, the command that resumes it."""
    console = console or stdout_console()
    done = sum(1 for j in result.jobs if j.ok)
    console.print(f"sweep {result.run_id} ({result.engine} engine): {len(result.jobs)} shard jobs, {done} complete, "
                  f"{len(result.failed)} failed, {result.seconds:.1f} s", markup=False)
    rows = shard_rows(result)
    columns = ["shard", "gpu", "requested", "used", "fell_back", "status", "rows", "skipped", "seconds", "reason"]
    if len({r["config"] for r in rows}) > 1:
        columns.insert(0, "config")
    console.print("")
    for line in format_table(rows, columns, {"fell_back": "fell back"}):
        console.print(line, markup=False, highlight=False)
    if result.summary:
        console.print("\nevents summary by GPU class:")
        summary = [{**row, "rate": None if row.get("rate") is None else f"{row['rate']:.1%}"} for row in result.summary]
        for line in format_table(summary, ["gpu_class", "shards", "fell_back", "rate", "strict_failures", "top_reason"],
                                 {"gpu_class": "gpu class", "fell_back": "fell back", "strict_failures": "strict failures",
                                  "top_reason": "most common reason"}):
            console.print(line, markup=False, highlight=False)
    skipped = skipped_lines(result)
    if skipped:
        console.print("\nskipped input rows (rows in = rows written + rows skipped):", markup=False)
        for line in skipped:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    # shards that failed the same way are listed once
    groups: dict[tuple, list] = {}
    for job in result.failed:
        groups.setdefault((job.exit_code, job.error_text or job.error or ""), []).append(job)
    for (code, text), jobs in groups.items():
        names = ", ".join(f"{j.config} {j.shard}" if "config" in columns else j.shard for j in jobs)
        where = f" (logs in {Path(jobs[0].log).parent})" if jobs[0].log else ""
        console.print(f"\nfailed ({_exit_text(code)}): shard{'s' if len(jobs) > 1 else ''} {names}{where}",
                      markup=False, soft_wrap=True)
        for line in text.splitlines():
            console.print(f"  {line.strip()}", markup=False, highlight=False, soft_wrap=True)
    console.print("")
    for name, merged in result.merged.items():
        console.print(f"output {name}: {merged['path']} ({merged['rows']} rows, {merged['order']})", markup=False)
    console.print(f"events: {result.events} (attnfallback events fallbacks {result.events})", markup=False)
    console.print(f"manifest: {result.manifest}", markup=False)
    if result.failed and resume_command:
        console.print(f"resume the failed shards: {resume_command}", markup=False)


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep_cmd(
        config: str = typer.Argument(..., help="The sweep's TOML configuration."),
        resume: bool = typer.Option(False, "--resume", help="Run only the shards that are not complete (same run id)."),
        engine: str = typer.Option("local", "--engine", help="local (one process per shard) | ray (a Ray cluster)."),
        address: str = typer.Option(None, "--address", help="Ray cluster address (engine ray; default: a local instance)."),
        as_json: bool = JSON,
    ):
        """Run every configuration x shard of a sweep; report failed shards, merge outputs, summarise the events."""
        progress = stderr_console()
        result = run_sweep(config, resume=resume, engine=engine, address=address,
                           echo=lambda line: progress.print(line, markup=False, highlight=False, soft_wrap=True))
        if as_json:
            print_json(result.to_dict())
        else:
            render_sweep(result, resume_command=f"attnfallback sweep {shlex.quote(config)} --resume")
        if result.exit_code:
            raise typer.Exit(result.exit_code)
