"""`attnfallback probe`: this machine's device and the installed attention kernels."""

from __future__ import annotations

import typer

from attnfallback.cli.common import JSON, print_json, stdout_console


def run_probe(device: str = "auto") -> dict:
    """The probed capabilities as a dict (device, software)."""
    from attnfallback.caps import probe

    return probe(device).to_dict()


def render(data: dict) -> None:
    from rich.table import Table

    dev = data["device"]
    console = stdout_console()
    where = dev["kind"] if dev["kind"] != "cuda" else f"{dev['name']} (class {dev['class']}, cc {dev['cc']}, {dev['memory_gb']} GB)"
    console.print(f"device: {where}; native bf16: {'yes' if dev['bf16'] else 'no'}")
    table = Table("package", "version", box=None, pad_edge=False)
    for key, value in data["software"].items():
        if key == "hub_offline":
            continue
        table.add_row(key, value if value else "[dim]absent[/dim]")
    console.print(table)
    console.print(f"hub: {'offline' if data['software']['hub_offline'] else 'online (if reachable)'}")


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe_cmd(
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps."),
        as_json: bool = JSON,
    ):
        """Show the device, its GPU class and compute capability, and the installed kernels."""
        data = run_probe(device)
        print_json(data) if as_json else render(data)
