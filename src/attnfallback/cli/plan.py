"""`attnfallback plan`: the preflight for a failover pool. For each GPU class, the implementation
it would get, whether strict would fail, and why; `--assume-installed` describes the pool's image."""

from __future__ import annotations

import typer

from attnfallback.cli.common import DTYPE, JSON, PREFER, REVISION, TRUST_REMOTE_CODE, print_json, split_list, stdout_console


def run_plan(
    model: str,
    gpus: list[str] | None = None,
    prefer: str | list[str] | None = None,
    dtype: str = "auto",
    assume_installed: list[str] | None = None,
    revision: str | None = None,
    auto_class: str = "AutoModel",
    trust_remote_code: bool = False,
) -> dict:
    """The plan per GPU class (or for this device when no classes are named)."""
    from attnfallback.caps import DeviceCaps, probe_device, probe_software
    from attnfallback.model_facts import read_facts
    from attnfallback.planner import plan
    from attnfallback.policy import Policy

    policy = Policy.resolve(mode="graceful", prefer=prefer)
    devices = [DeviceCaps.from_class(g) for g in gpus] if gpus else [probe_device("auto")]
    software = probe_software()
    if assume_installed:
        software = software.with_installed(assume_installed)
    facts = read_facts(model, revision=revision, auto_class=auto_class, trust_remote_code=trust_remote_code)
    rows = []
    for dev in devices:
        p = plan(facts, dev, software, policy, dtype, enforce_strict=False)
        rows.append({"gpu": dev.to_dict(), **p.to_dict()})
    return {"model": facts.to_dict(), "prefer": list(policy.prefer), "software": software.to_dict(), "plans": rows}


def render(data: dict) -> None:
    from rich.table import Table

    console = stdout_console()
    console.print(f"model: {data['model']['id']} ({data['model']['architecture']}, head_dim {data['model']['head_dim']})")
    console.print(f"prefer: {', '.join(data['prefer'])}")
    table = Table("GPU class", "cc", "dtype", "gets", "strict", "why not the ones before", box=None, pad_edge=False)
    for row in data["plans"]:
        gpu = row["gpu"]
        why = "; ".join(f"{c['impl']}: {', '.join(c['reasons'])}" for c in row["candidates"] if c["reasons"] and c["impl"] != row["chosen"])
        gets = row["chosen"] or "[red]nothing[/red]"
        if row["chosen"] and row["fell_back"]:
            gets = f"[yellow]{row['chosen']}[/yellow]"
        table.add_row(gpu["class"] or gpu["kind"], gpu["cc"] or "-", row["dtype"], gets, "ok" if row["strict_ok"] else "[red]fails[/red]", why or "-")
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        model: str = typer.Argument(..., help="Local directory, hub id, or 'default'."),
        gpus: str = typer.Option(None, "--gpus", help="GPU classes of the pool, e.g. H100,A6000,T4 (default: this device)."),
        prefer: str = PREFER,
        dtype: str = DTYPE,
        assume_installed: str = typer.Option(None, "--assume-installed", help="Packages the pool's image has, e.g. flash-attn,flash-attn-4."),
        policy: str = typer.Option("graceful", "--policy", help="strict: exit 3 when any class would fail strict."),
        revision: str = REVISION,
        trust_remote_code: bool = TRUST_REMOTE_CODE,
        as_json: bool = JSON,
    ):
        """For each GPU class of a pool: the implementation it gets, whether strict would fail, and why."""
        from attnfallback.policy import Mode, parse_mode

        mode = parse_mode(policy)
        data = run_plan(model, split_list(gpus), prefer, dtype, split_list(assume_installed), revision, trust_remote_code=trust_remote_code)
        print_json(data) if as_json else render(data)
        if mode is Mode.STRICT and not all(r["strict_ok"] for r in data["plans"]):
            raise typer.Exit(3)
