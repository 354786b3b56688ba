"""`attnfallback parity`: each implementation's outputs against a reference's, on the same rows.

Exit 4 when an implementation is over tolerance (after the report and the `parity` event)."""

from __future__ import annotations

import typer

from attnfallback.cli.common import ALLOW_NEW_HEAD, DEVICE, DTYPE, EVENTS, JSON, REVISION, RUN_ID, SHARD, TRUST_REMOTE_CODE, print_json, split_list, stdout_console


def run_parity_command(
    model: str,
    input_path: str,
    task: str = "embed",
    impls: str | None = None,
    reference: str = "eager",
    dtype: str = "auto",
    device: str = "auto",
    tolerance: float | None = None,
    rows: int | None = None,
    text_column: str | None = None,
    text_columns: str | None = None,
    top_k: int = 10,
    events: str | None = None,
    run_id: str | None = None,
    shard: str | None = None,
    revision: str | None = None,
    auto_class: str | None = None,
    trust_remote_code: bool = False,
    allow_new_head: bool = False,
) -> dict:
    """Run parity and write the `parity` event; the report as a dict (check `passed`)."""
    from attnfallback.errors import UsageError
    from attnfallback.parity import parity_event_fields, read_texts, run_parity
    from attnfallback.sharding import parse_shard

    if text_column and text_columns:
        raise UsageError("give either --text-column or --text-columns, not both")
    if shard is not None:
        parse_shard(shard)
    columns = split_list(text_columns) or ([text_column] if text_column else None)
    texts = read_texts(input_path, columns, rows=rows, task=task)
    report = run_parity(model, texts, task=task, impls=split_list(impls), reference=reference, dtype=dtype, device=device,
                        tolerance=tolerance, top_k=top_k, revision=revision, auto_class=auto_class,
                        trust_remote_code=trust_remote_code, allow_new_head=allow_new_head)
    data = report.to_dict()
    data["input"] = str(input_path)
    from attnfallback.events import open_sink

    sink = open_sink(events, run_id, shard)
    if sink is not None:
        with sink:
            sink.emit("parity", input=str(input_path), **parity_event_fields(report))
            data["events"] = str(sink.path)
    return data


def _num(value, fmt: str = ".2e") -> str:
    if value is None:
        return "-"
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def render(data: dict) -> None:
    from rich.table import Table

    console = stdout_console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a pipe or a log: keep the table's columns whole
    m = data["model"]
    console.print(f"model: {m['id']} ({m['architecture']}, {data['dtype']}) on {data['gpu']['class']}; task {data['task']}")
    console.print(f"rows: {data['rows']} ({data['texts']} inputs, {data['skipped']} skipped) from {data['input']}")
    cal = data.get("calibration")
    if cal:
        console.print(
            f"tolerance: {data['tolerance']:.2e} on relative L2 ({cal['note']}; {cal['reference']} in {cal['dtype']} "
            f"vs fp32: {cal['rel_l2_vs_fp32']:.2e}, floor {cal['floor']:.0e})"
        )
    else:
        console.print(f"tolerance: {data['tolerance']:.2e} on relative L2 (given)")
    table = Table("implementation", "rel L2", "max abs", "min cos", "spearman", "kendall", "top-k", "gold ρ", "verdict",
                  box=None, pad_edge=False)
    ref_gold = data.get("reference_label_spearman")
    table.add_row(f"{data['reference']} (reference)", "-", "-", "-", "-", "-", "-", _num(ref_gold, ".4f"), "")
    for name, r in data["results"].items():
        verdict = "[green]within[/green]" if r["within_tolerance"] else "[red]OVER[/red]"
        label = name if r["actual"] == name else f"{name} (runs {r['actual']})"
        table.add_row(label, _num(r["rel_l2"]), _num(r["max_abs"]), _num(r.get("min_cosine"), ".6f"), _num(r["spearman"], ".4f"),
                      _num(r["kendall"], ".4f"), _num(r["top_k_agreement"], ".2f"), _num(r.get("label_spearman"), ".4f"), verdict)
    console.print(table)
    for name, reasons in data["unavailable"].items():
        console.print(f"  [dim]not run[/dim] {name}: {'; '.join(reasons)}")
    if data.get("events"):
        console.print(f"event written to {data['events']}")


def register(app: typer.Typer) -> None:
    @app.command("parity")
    def parity_cmd(
        model: str = typer.Argument(..., help="Local directory, hub id, or 'default'."),
        input_path: str = typer.Option(..., "--input", help="Texts in any format score reads (JSONL, CSV/TSV, plain or compressed, Parquet, Arrow, a saved dataset; STS-B's header-less CSV too)."),
        task: str = typer.Option("embed", "--task", help="embed | classify | pairs."),
        impls: str = typer.Option(None, "--impls", help="Implementations to compare (default: the default preference list)."),
        reference: str = typer.Option("eager", "--reference", help="The implementation the others are compared with."),
        dtype: str = DTYPE,
        device: str = DEVICE,
        tolerance: float = typer.Option(None, "--tolerance", help="Largest relative L2 error allowed (default: calibrated, see the output)."),
        rows: int = typer.Option(None, "--rows", help="Use the first N rows."),
        text_column: str = typer.Option(None, "--text-column", help="The text column (default: 'text')."),
        text_columns: str = typer.Option(None, "--text-columns", help="Two text columns, e.g. sentence1,sentence2 (all their texts are used)."),
        top_k: int = typer.Option(10, "--top-k", help="k of the top-k ranking agreement."),
        events: str = EVENTS,
        run_id: str = RUN_ID,
        shard: str = SHARD,
        revision: str = REVISION,
        auto_class: str = typer.Option(None, "--auto-class", help="Override the task's auto class."),
        trust_remote_code: bool = TRUST_REMOTE_CODE,
        allow_new_head: bool = ALLOW_NEW_HEAD,
        as_json: bool = JSON,
    ):
        """The same rows through each implementation that runs here, against a reference; exit 4 when one is over tolerance."""
        from attnfallback.errors import ParityError

        data = run_parity_command(model, input_path, task, impls, reference, dtype, device, tolerance, rows, text_column,
                                  text_columns, top_k, events, run_id, shard, revision, auto_class, trust_remote_code,
                                  allow_new_head)
        print_json(data) if as_json else render(data)
        if not data["passed"]:
            worst = ", ".join(f"{n} {data['results'][n]['rel_l2']:.2e}" for n in data["failures"])
            raise ParityError(f"over tolerance {data['tolerance']:.2e} (relative L2): {worst}")
