"""`attnfallback score`: score one shard of an input file into a Parquet output."""

from __future__ import annotations

from dataclasses import replace

import typer
from typer.core import TyperCommand

from attnfallback.cli.common import ALLOW_NEW_HEAD, DEVICE, DTYPE, EVENTS, JSON, POLICY, PREFER, REVISION, RUN_ID, SHARD, TRUST_REMOTE_CODE, literal_help, print_json, split_list, stdout_console
from attnfallback.sweep.ray_engine import INSTALL_HINT


def render(data: dict) -> None:
    console = stdout_console()
    d = data["decision"]
    if data.get("already_complete"):
        console.print(f"{data['output']}: already complete ({data['rows_written']} rows); nothing to do")
        return
    console.print(f"{data['output']}: {data['rows_written']} rows written, {data['rows_skipped']} skipped "
                  f"(of {data['rows_in']} in shard {data['shard']})")
    if data["rows_skipped"]:
        lines = ", ".join(str(s["line"]) for s in data["skipped"][:20])
        more = f" and {data['rows_skipped'] - 20} more" if data["rows_skipped"] > 20 else ""
        console.print(f"  skipped lines: {lines}{more}")
    console.print(f"  {data['tokens']:,} tokens ({data['truncated']} texts truncated), {data['tokens_per_s']:,.0f} tokens/s, "
                  f"{data['seconds']:.1f} s; attention {d.get('used')}" + (" (fell back)" if d.get("fell_back") else ""))
    if data["nonfinite"]:
        console.print(f"  [yellow]{data['nonfinite']} row(s) flagged non-finite[/yellow]")
    if data["resumed_parts"]:
        console.print(f"  resumed after {data['resumed_parts']} committed part(s)")
    if data.get("events"):
        console.print(f"  events: {data['events']}")


def register(app: typer.Typer) -> None:
    @app.command("score", cls=ScoreCommand)
    def score_cmd(
        ctx: typer.Context,
        model: str = typer.Argument(..., help="Local directory, hub id, or 'default'."),
        input: str = typer.Option(..., "--input", help="JSONL, CSV or TSV (each plain, .gz or .zst), Parquet, Arrow (.arrow, .feather), or a directory written by datasets' save_to_disk; by extension."),
        output: str = typer.Option(..., "--output", help="Output Parquet file (committed atomically)."),
        task: str = typer.Option("embed", "--task", help="embed | classify | pairs | logprob."),
        text_column: str = typer.Option(None, "--text-column", help="Text column (default: 'text', else the only string column, named on stderr)."),
        text_columns: str = typer.Option(None, "--text-columns", help="Two columns: a,b for pairs; prompt,completion for logprob."),
        id_column: str = typer.Option(None, "--id-column", help="Id column, unique and never null (default: 'id' where the input has one, else the 0-based row number; '': the row number always)."),
        shard: str = SHARD,
        prefer: str = PREFER,
        policy: str = POLICY,
        measure: str = typer.Option(None, "--measure", help="auto: under graceful on a CUDA GPU, time the viable implementations on this shard's first rows and keep the fastest (the preference wins ties within 5%) | on: on any device | off: the preference order alone (default: $ATTNFALLBACK_MEASURE or auto)."),
        dtype: str = DTYPE,
        device: str = DEVICE,
        batch_tokens: int = typer.Option(None, "--batch-tokens", help="Padded tokens per batch (default per device and attention implementation)."),
        max_length: int = typer.Option(None, "--max-length", help="Truncate texts to this many tokens (counted)."),
        packing: str = typer.Option("auto", "--packing", help="auto: padding-free batches under flash implementations (checked first) | off."),
        tokenizer_process: str = typer.Option("auto", "--tokenizer-process", help="auto: on CUDA, tokenize in a child process, so the thread launching the forward keeps the GIL | off: in a thread."),
        events: str = EVENTS,
        run_id: str = RUN_ID,
        resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last committed part (or keep a completed output)."),
        on_bad_row: str = typer.Option("error", "--on-bad-row", help="error | skip (skipped rows are listed with their lines)."),
        on_nonfinite: str = typer.Option("error", "--on-nonfinite", help="error | flag (a `nonfinite` column)."),
        part_rows: int = typer.Option(8192, "--part-rows", help="Rows per committed part (the unit of --resume)."),
        first_part_rows: int = typer.Option(1024, "--first-part-rows", help="Rows of the first part; parts double from there up to --part-rows, so the GPU starts after a small part's tokenizing."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
        engine: str = typer.Option("local", "--engine", help=literal_help(f"local | ray ({INSTALL_HINT}).")),
        address: str = typer.Option(None, "--address", help="Ray cluster address (with --engine ray; default: a local Ray)."),
        actors: str = typer.Option("auto", "--actors", help="Ray actors, each one shard in the events (with --engine ray): N, or auto: one per GPU of the cluster (num_gpus=1 each), 2 without GPUs."),
        revision: str = REVISION,
        trust_remote_code: bool = TRUST_REMOTE_CODE,
        allow_new_head: bool = ALLOW_NEW_HEAD,
        job_file: str = typer.Option(None, "--job", help="Read the whole job from this JSON file (ScoreJob.to_dict's fields, as a sweep writes it): MODEL, --input, --output and the job's other options are not given then (--engine, --address, --actors, --result and --json may be)."),
        result_file: str = typer.Option(None, "--result", help="Write the result of a run that completes (the object --json prints) to this JSON file too, atomically."),
        as_json: bool = JSON,
    ):
        """Score MODEL over one shard of --input into --output (Parquet, id first, input order)."""
        from attnfallback import atomic
        from attnfallback.sweep.engines import run_score_engine

        job = read_job(ctx, job_file) if job_file is not None else job_from_options(ctx)
        if as_json:
            job = replace(job, quiet=True)
        data = run_score_engine(job, engine, address=address, actors=actors).to_dict()
        if result_file is not None:
            atomic.write_json(result_file, data, indent=2, default=str)
        print_json(data) if as_json else render(data)


JOB_REQUIRED = ("model", "input", "output")


class ScoreCommand(TyperCommand):
    """`score`, whose MODEL, --input and --output are required (Click's own error, exit 2) unless
    --job is given: the job file holds them then."""

    def parse_args(self, ctx, args):
        relaxed = [p for p in self.params if p.name in JOB_REQUIRED] if _names_job(args) else []
        for param in relaxed:
            param.required = False
        try:
            return super().parse_args(ctx, args)
        finally:
            for param in relaxed:
                param.required = True


def _names_job(args: list[str]) -> bool:
    return any(a == "--job" or a.startswith("--job=") for a in args)


def job_from_options(ctx: typer.Context):
    """The ScoreJob of MODEL and the options: each ScoreJob field from the parameter of its name."""
    from attnfallback.errors import UsageError
    from attnfallback.scoring.job import ScoreJob

    missing = [name for name in JOB_REQUIRED if ctx.params[name] is None]
    if missing:  # the word --job was another option's value: they were relaxed for a job file that is not there
        raise UsageError("MODEL, --input and --output are required without --job")
    values = {name: ctx.params[name] for name in job_fields()}
    values["text_columns"] = split_list(values["text_columns"])
    return ScoreJob(**values)


def read_job(ctx: typer.Context, path: str):
    """The ScoreJob in the JSON file `path` (`--job`). An option of the job given besides it, a
    missing or unreadable file, or a file that is no job: a UsageError (exit 2)."""
    import json
    from pathlib import Path

    from attnfallback.errors import UsageError
    from attnfallback.scoring.job import ScoreJob

    given = [name for name in job_fields() if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"]
    if given:
        flags = {p.name: (p.opts[0] if p.param_type_name == "option" else p.name.upper()) for p in ctx.command.params}
        raise UsageError(f"--job {path} holds the whole job; given besides it: {', '.join(flags[n] for n in given)} "
                         "(write them into the job file instead)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--job {path}: cannot read the job file: {e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--job {path}: not JSON: {e}") from None
    return ScoreJob.from_dict(data, where=path)


def job_fields() -> list[str]:
    """The ScoreJob fields, each also a parameter of `score` of the same name."""
    from dataclasses import fields

    from attnfallback.scoring.job import ScoreJob

    return [f.name for f in fields(ScoreJob)]
