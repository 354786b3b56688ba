"""`attnfallback events summary|fallbacks|runs|sql|plot DIR...`: query shards' event logs.

The `*_table` functions return pyarrow tables (tests assert on them); the Typer commands print
them as a table, JSON or CSV. Reading problems (torn lines, files that are not JSONL, newer
schema versions) go to stderr; `--strict-read` turns an unreadable line into exit 2.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from attnfallback.cli.common import print_json
from attnfallback.errors import UnknownNameError, UsageError

if TYPE_CHECKING:
    import pyarrow as pa

    from attnfallback.events.query import EventLog

FORMATS = ("table", "json", "csv")
SUMMARY_BY = ("gpu_class", "model", "run", "host")
SUMMARY_LABELS = {"gpu_class": "GPU class", "model": "model", "run": "run", "host": "host"}
MAX_REPORTED = 10
MAX_CELL = 60

DIRS = typer.Argument(..., metavar="DIR...", help="Events directories, files or globs (several allowed).")
FORMAT = typer.Option("table", "--format", help="table | json | csv.")
JSON = typer.Option(False, "--json", help="Print JSON on stdout (the same as --format json).")
STRICT_READ = typer.Option(False, "--strict-read", help="Fail (exit 2) on a torn or malformed line instead of skipping it.")


# --- data (what tests check) ----------------------------------------------------------------

def open_events(dirs: list[str], strict_read: bool = False, report: bool = True) -> EventLog:
    """Open the event log under `dirs`; report reading problems on stderr."""
    from attnfallback.events import open_log

    log = open_log(*dirs, strict_read=strict_read)
    if report:
        report_reading(log)
    return log


def summary_table(dirs: list[str], by: str = "gpu_class", strict_read: bool = False) -> pa.Table:
    """Shards, fallbacks, rate, strict failures and the top reason per `by`."""
    _check_choice("summary key", by, SUMMARY_BY)
    with open_events(dirs, strict_read) as log:
        return log.summary(by=by)


def fallbacks_table(dirs: list[str], strict_read: bool = False, include_failures: bool = True) -> pa.Table:
    """One row per load that fell back (and per strict failure): requested -> used, reasons."""
    with open_events(dirs, strict_read) as log:
        return log.fallbacks(include_failures=include_failures)


def runs_table(dirs: list[str], strict_read: bool = False) -> pa.Table:
    """One row per run."""
    with open_events(dirs, strict_read) as log:
        return log.runs()


def sql_table(dirs: list[str], query: str, strict_read: bool = False) -> pa.Table:
    """The result of one read-only statement over the views events, decisions, attn_impl, shards."""
    from attnfallback.events.query import check_read_only

    check_read_only(query)  # before reading anything: a refused statement costs nothing
    with open_events(dirs, strict_read) as log:
        return log.sql(query)


def plot_file(dirs: list[str], out: str, by: str = "gpu_class", strict_read: bool = False) -> Path:
    """A bar chart of the fallback rate per `by` (default GPU class), written to `out`."""
    _check_choice("summary key", by, SUMMARY_BY)
    out_path = Path(out)
    if out_path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--out must end in .png, .svg or .pdf, got {out}")
    if not out_path.parent.is_dir():
        raise UsageError(f"--out directory {out_path.parent} does not exist")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("events plot needs matplotlib: pip install 'attnfallback[plot]'") from e
    table = summary_table(dirs, by=by, strict_read=strict_read)
    rows = table.to_pylist()
    labels = [str(r[by]) if r[by] is not None else "(none)" for r in rows]
    rates = [100.0 * r["rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.6))
    bars = ax.bar(labels, rates, color="#d9822b")
    for bar, row in zip(bars, rows):
        ax.annotate(f"{row['fell_back']}/{row['shards']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("shards that fell back (%)")
    ax.set_ylim(0, max(rates + [1.0]) * 1.15)
    ax.set_title(f"attention fallback rate per {SUMMARY_LABELS[by]}")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


# --- output ---------------------------------------------------------------------------------

def report_reading(log: EventLog, stream=None) -> None:
    """Unreadable lines and skipped files, on stderr (schema warnings go through logging)."""
    stream = stream or sys.stderr
    if log.unreadable:
        stream.write(f"warning: skipped {len(log.unreadable)} unreadable line(s) "
                     f"(--strict-read makes this an error):\n")
        for item in log.unreadable[:MAX_REPORTED]:
            stream.write(f"  {item}\n")
        if len(log.unreadable) > MAX_REPORTED:
            stream.write(f"  ... and {len(log.unreadable) - MAX_REPORTED} more\n")
    if log.skipped_files:
        stream.write(f"warning: {len(log.skipped_files)} file(s) not read as events:\n")
        for item in log.skipped_files[:MAX_REPORTED]:
            stream.write(f"  {item}\n")
        if len(log.skipped_files) > MAX_REPORTED:
            stream.write(f"  ... and {len(log.skipped_files) - MAX_REPORTED} more\n")


def _json_value(value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        return value.isoformat() + ("Z" if value.tzinfo is None else "")
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def _text_value(value: Any, column: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if column == "rate" else f"{value:.6g}"
    if isinstance(value, list):
        return "; ".join(_text_value(v) for v in value)
    if isinstance(value, _dt.datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value)


def format_rows(table: pa.Table, fmt: str) -> str:
    """`table` as text: an aligned table, a JSON array of objects, or CSV with a header."""
    _check_choice("format", fmt, FORMATS)
    rows = table.to_pylist()
    names = table.column_names
    if fmt == "json":
        import json

        return json.dumps([_json_value(r) for r in rows], indent=2, default=str) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(names)
        for r in rows:
            writer.writerow(["" if r[n] is None else
                             (_text_value(r[n]) if isinstance(r[n], (list, _dt.datetime)) else r[n])
                             for n in names])
        return buffer.getvalue()
    cells = [[_text_value(r[n], n) for n in names] for r in rows]
    widths = [len(n) for n in names]
    for row in cells:
        for i, cell in enumerate(row[:-1]):  # the last column (often reasons) is never cut
            if len(cell) > MAX_CELL:
                row[i] = cell[:MAX_CELL - 1] + "…"
            widths[i] = max(widths[i], len(row[i]))
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    if not rows:
        lines.append("(no rows)")
    return "\n".join(lines) + "\n"


def print_rows(table: pa.Table, fmt: str) -> None:
    if fmt == "json":
        print_json([_json_value(r) for r in table.to_pylist()])
        return
    sys.stdout.write(format_rows(table, fmt))
    sys.stdout.flush()


def output_format(fmt: str, as_json: bool) -> str:
    """--format, or json with --json (which every command takes); both, disagreeing, is an error."""
    _check_choice("format", fmt, FORMATS)
    if as_json and fmt not in ("table", "json"):
        raise UsageError(f"--json and --format {fmt} disagree: give one of them")
    return "json" if as_json else fmt


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UnknownNameError(kind, value, valid)


# --- commands -------------------------------------------------------------------------------

def build_events_app() -> typer.Typer:
    events_app = typer.Typer(
        help="Query event logs: which shards fell back, from what to what, why, how often.",
        no_args_is_help=True,
    )

    @events_app.command("summary")
    def summary(
        dirs: list[str] = DIRS,
        by: str = typer.Option("gpu_class", "--by", help="gpu_class | model | run | host."),
        fmt: str = FORMAT,
        strict_read: bool = STRICT_READ,
        as_json: bool = JSON,
    ) -> None:
        """Per GPU class (or model, run, host): shards, fell back, rate, strict failures, top reason."""
        fmt = output_format(fmt, as_json)
        table = summary_table(dirs, by=by, strict_read=strict_read)
        print_rows(table, fmt)
        if fmt == "table":
            shards = sum(table.column("shards").to_pylist())
            fell_back = sum(table.column("fell_back").to_pylist())
            failed = sum(table.column("strict_failures").to_pylist())
            sys.stdout.write(f"\n{shards} shards: {fell_back} fell back ({100 * fell_back / shards:.1f}%), "
                             f"{failed} strict failure(s)\n")

    @events_app.command("fallbacks")
    def fallbacks(
        dirs: list[str] = DIRS,
        fmt: str = FORMAT,
        strict_read: bool = STRICT_READ,
        no_failures: bool = typer.Option(False, "--no-failures", help="Leave out strict failures (attn_unavailable)."),
        as_json: bool = JSON,
    ) -> None:
        """Every shard that fell back or failed: run, shard, GPU, requested -> used, reasons."""
        fmt = output_format(fmt, as_json)
        table = fallbacks_table(dirs, strict_read=strict_read, include_failures=not no_failures)
        if fmt == "table":
            table = table.select(["run_id", "shard", "outcome", "gpu_class", "requested", "used",
                                  "kernels", "reasons"])
        print_rows(table, fmt)

    @events_app.command("runs")
    def runs(dirs: list[str] = DIRS, fmt: str = FORMAT, strict_read: bool = STRICT_READ, as_json: bool = JSON) -> None:
        """One row per run: shards, fallbacks, strict failures, interrupted shards, rows written and skipped, tokens, time span."""
        fmt = output_format(fmt, as_json)
        print_rows(runs_table(dirs, strict_read=strict_read), fmt)

    @events_app.command("sql")
    def sql(
        dirs: list[str] = DIRS,
        query: str = typer.Argument(..., metavar="QUERY", help="One read-only statement (views: events, decisions, attn_impl, shards)."),
        fmt: str = FORMAT,
        strict_read: bool = STRICT_READ,
        as_json: bool = JSON,
    ) -> None:
        """Run one read-only SQL statement over the views events, decisions, attn_impl, shards."""
        fmt = output_format(fmt, as_json)
        print_rows(sql_table(dirs, query, strict_read=strict_read), fmt)

    @events_app.command("plot")
    def plot(
        dirs: list[str] = DIRS,
        out: str = typer.Option(..., "--out", help="Image file to write (.png, .svg or .pdf)."),
        by: str = typer.Option("gpu_class", "--by", help="gpu_class | model | run | host."),
        strict_read: bool = STRICT_READ,
        as_json: bool = JSON,
    ) -> None:
        """Bar chart of the fallback rate per GPU class."""
        path = plot_file(dirs, out, by=by, strict_read=strict_read)
        if as_json:
            print_json({"wrote": str(path)})
        else:
            typer.echo(f"wrote {path}", err=True)

    return events_app


def register(app: typer.Typer) -> None:
    app.add_typer(build_events_app(), name="events")
