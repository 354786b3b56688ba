"""`attnfallback score`: score one shard of an input file into a Parquet output."""

from __future__ import annotations

import typer

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
    @app.command("score")
    def score_cmd(
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
        as_json: bool = JSON,
    ):
        """Score MODEL over one shard of --input into --output (Parquet, id first, input order)."""
        from attnfallback.scoring.job import ScoreJob
        from attnfallback.sweep.engines import run_score_engine

        job = ScoreJob(
            model=model, input=input, output=output, task=task, text_column=text_column,
            text_columns=split_list(text_columns), id_column=id_column, shard=shard, prefer=prefer, policy=policy,
            dtype=dtype, device=device, batch_tokens=batch_tokens, max_length=max_length, events=events, run_id=run_id,
            resume=resume, on_bad_row=on_bad_row, on_nonfinite=on_nonfinite, quiet=quiet or as_json, revision=revision,
            trust_remote_code=trust_remote_code, part_rows=part_rows, first_part_rows=first_part_rows, packing=packing, tokenizer_process=tokenizer_process,
            measure=measure, allow_new_head=allow_new_head,
        )
        data = run_score_engine(job, engine, address=address, actors=actors).to_dict()
        print_json(data) if as_json else render(data)
