"""`attnfallback load`: load a model through the fallback, verify it, and show the decision."""

from __future__ import annotations

import typer

from attnfallback.cli.common import ALLOW_NEW_HEAD, DEVICE, DTYPE, EVENTS, JSON, POLICY, PREFER, REVISION, RUN_ID, SHARD, TRUST_REMOTE_CODE, print_json, stdout_console


def run_load(
    model: str,
    prefer: str | None = None,
    policy: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    events: str | None = None,
    run_id: str | None = None,
    shard: str | None = None,
    revision: str | None = None,
    auto_class: str = "AutoModel",
    trust_remote_code: bool = False,
    allow_new_head: bool = False,
) -> dict:
    """Load through the fallback; the decision as a dict (the attn_impl event's fields)."""
    from attnfallback.loader import load_model
    from attnfallback.policy import Policy
    from attnfallback.sharding import parse_shard

    if shard is not None:
        parse_shard(shard)
    loaded = load_model(
        model,
        revision=revision,
        auto_class=auto_class,
        dtype=dtype,
        device=device,
        policy=Policy.resolve(mode=policy, prefer=prefer),
        events=events,
        run_id=run_id,
        shard=shard,
        trust_remote_code=trust_remote_code,
        allow_new_head=allow_new_head,
    )
    data = loaded.decision.to_dict()
    if loaded.sink is not None:
        data["events"] = str(loaded.sink.path)
    return data


def render(data: dict) -> None:
    console = stdout_console()
    m = data["model"]
    console.print(f"model: {m['id']} ({m['architecture']}, {m['dtype']}) on {data['gpu']['class']}")
    console.print(f"policy: {data['policy']['mode']}, prefer {', '.join(data['policy']['prefer'])}")
    for a in data["attempts"]:
        mark = "[green]ok[/green]" if a["ok"] else "[red]no[/red]"
        console.print(f"  {mark} {a['impl']:<18} {a['stage']:<7} {'; '.join(a['reasons'])}")
    if data["fell_back"]:
        console.print(f"[yellow]fell back[/yellow]: requested {data['requested']}, using {data['used']}")
    else:
        console.print(f"using {data['used']} as requested")
    if data.get("kernels"):
        console.print(f"kernels: {', '.join(data['kernels'])}")
    t = data["timing"]
    console.print(f"load {t.get('load_s', 0):.2f} s, verify {t.get('verify_s', 0):.2f} s")
    if data.get("events"):
        console.print(f"event written to {data['events']}")


def register(app: typer.Typer) -> None:
    @app.command("load")
    def load_cmd(
        model: str = typer.Argument(..., help="Local directory, hub id, or 'default'."),
        prefer: str = PREFER,
        policy: str = POLICY,
        dtype: str = DTYPE,
        device: str = DEVICE,
        events: str = EVENTS,
        run_id: str = RUN_ID,
        shard: str = SHARD,
        revision: str = REVISION,
        auto_class: str = typer.Option("AutoModel", "--auto-class", help="AutoModel, AutoModelForSequenceClassification, AutoModelForCausalLM, ..."),
        trust_remote_code: bool = TRUST_REMOTE_CODE,
        allow_new_head: bool = ALLOW_NEW_HEAD,
        as_json: bool = JSON,
    ):
        """Load MODEL with the fastest implementation that runs here; show what was requested, what runs, and why."""
        data = run_load(model, prefer, policy, dtype, device, events, run_id, shard, revision, auto_class, trust_remote_code,
                        allow_new_head)
        print_json(data) if as_json else render(data)
