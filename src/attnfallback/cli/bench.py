"""`attnfallback bench`: tokens/s of each attention implementation that runs here, warm-up apart."""

from __future__ import annotations

import typer

from attnfallback.cli.common import DEVICE, DTYPE, JSON, REVISION, TRUST_REMOTE_CODE, print_json, split_list, stdout_console


def run_bench_command(
    model: str,
    impls: str | None = None,
    input_path: str | None = None,
    lengths: str | None = None,
    seconds: float = 5.0,
    dtype: str = "auto",
    device: str = "auto",
    rows: int | None = None,
    text_column: str | None = None,
    text_columns: str | None = None,
    batch_tokens: int | None = None,
    auto_class: str = "AutoModel",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Benchmark and return the report as a dict."""
    from attnfallback.bench import run_bench
    from attnfallback.errors import UsageError

    if input_path is not None and lengths is not None:
        raise UsageError("give either --input or --lengths, not both")
    if batch_tokens is not None and batch_tokens < 1:
        raise UsageError(f"--batch-tokens must be >= 1, found {batch_tokens}")
    texts = None
    if input_path is not None:
        from attnfallback.parity import read_texts

        columns = split_list(text_columns) or ([text_column] if text_column else None)
        texts = read_texts(input_path, columns, rows=rows).texts()
    elif rows is not None and rows < 1:
        raise UsageError(f"--rows must be >= 1, found {rows}")
    report = run_bench(model, impls=split_list(impls), lengths=lengths, texts=texts, text_source=str(input_path or "texts"),
                       seconds=seconds, dtype=dtype, device=device, sequences=rows if input_path is None else None,
                       batch_tokens=batch_tokens, auto_class=auto_class, revision=revision, trust_remote_code=trust_remote_code)
    return report.to_dict()


def render(data: dict) -> None:
    from rich.table import Table

    console = stdout_console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a pipe or a log: keep the table's columns whole
    m, w = data["model"], data["workload"]
    console.print(f"model: {m['id']} ({m['architecture']}, {data['dtype']}) on {data['gpu']['class']}")
    what = w.get("distribution") or w["source"]
    clipped = f", clipped to {w['clipped_to']}" if w.get("clipped_to") else ""
    console.print(f"workload: {what}: {w['sequences']} sequences, {w['tokens']} tokens, mean {w['mean_length']:.0f}, max {w['max_length']}{clipped}")
    table = Table("implementation", "tokens/s", "vs fastest", "median s", "repeats", "warm-up s", "compile s", "padded", box=None, pad_edge=False)
    for name, r in sorted(data["results"].items(), key=lambda kv: -kv[1]["tokens_per_s"]):
        label = name if r["actual"] == name else f"{name} (runs {r['actual']})"
        pad = r["padded_tokens"] / r["tokens"] if r["tokens"] else 0
        table.add_row(label, f"{r['tokens_per_s']:,.0f}", f"{r['relative_to_fastest']:.2f}x", f"{r['median_s']:.4f}", str(r["repeats"]),
                      f"{r['warmup_s']:.3f}", f"{r['compile_s']:.3f}", f"{pad:.2f}x")
    console.print(table)
    for name, reasons in data["unavailable"].items():
        console.print(f"  [dim]not run[/dim] {name}: {'; '.join(reasons)}")
    if data["fastest"]:
        console.print(f"fastest here: {data['fastest']}")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        model: str = typer.Argument(..., help="Local directory, hub id, or 'default'."),
        impls: str = typer.Option(None, "--impls", help="Implementations to measure (default: the default preference list)."),
        input_path: str = typer.Option(None, "--input", help="Texts to measure on (CSV/TSV, JSONL, Parquet)."),
        lengths: str = typer.Option(None, "--lengths", help="short | long | normal:MEAN:STD:MAX (default: short)."),
        seconds: float = typer.Option(5.0, "--seconds", help="Timed seconds per implementation (after its warm-up)."),
        dtype: str = DTYPE,
        device: str = DEVICE,
        rows: int = typer.Option(None, "--rows", help="First N rows of --input, or N sequences drawn from --lengths."),
        text_column: str = typer.Option(None, "--text-column", help="The text column of --input (default: 'text')."),
        text_columns: str = typer.Option(None, "--text-columns", help="Several text columns of --input, all texts used."),
        batch_tokens: int = typer.Option(None, "--batch-tokens", help="Padded tokens per batch (default: the scorer's, by device)."),
        auto_class: str = typer.Option("AutoModel", "--auto-class", help="AutoModel, AutoModelForSequenceClassification, AutoModelForCausalLM, ..."),
        revision: str = REVISION,
        trust_remote_code: bool = TRUST_REMOTE_CODE,
        as_json: bool = JSON,
    ):
        """tokens/s of each implementation that runs here (warm-up and compilation reported apart; median of repeats)."""
        data = run_bench_command(model, impls, input_path, lengths, seconds, dtype, device, rows, text_column, text_columns,
                                 batch_tokens, auto_class, revision, trust_remote_code)
        print_json(data) if as_json else render(data)
