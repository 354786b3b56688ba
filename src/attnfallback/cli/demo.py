"""`attnfallback demo`: a 4-shard sweep over the STS-B test sentences with the embedded model."""

from __future__ import annotations

import typer

from attnfallback.cli.common import JSON, print_json, stderr_console, stdout_console


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        policy: str = typer.Option("graceful", "--policy", help="graceful (fall back, record why) | strict (fail with the reasons, exit 3)."),
        out: str = typer.Option(None, "--out", help="Output directory (default: a fresh ./demo-out/<run id>)."),
        as_json: bool = JSON,
    ):
        """Score STS-B with 4 shards preferring flash_attention_2 > sdpa > eager; show what each shard used and why, and the Spearman."""
        from attnfallback.cli.sweep import render_sweep
        from attnfallback.errors import UnknownNameError
        from attnfallback.sweep.demo import DEMO_PREFER, DEMO_SHARDS, run_demo

        if policy not in ("graceful", "strict"):
            raise UnknownNameError("demo policy", policy, ("graceful", "strict"))
        progress = stderr_console()
        progress.print(f"demo: {DEMO_SHARDS} shards of the STS-B test sentences, model default (all-MiniLM-L6-v2), "
                       f"policy {policy}, prefer {' > '.join(DEMO_PREFER)}", markup=False, soft_wrap=True)
        result = run_demo(policy=policy, out=out,
                          echo=lambda line: progress.print(line, markup=False, highlight=False, soft_wrap=True))
        if as_json:
            print_json(result.to_dict())
        else:
            console = stdout_console()
            render_sweep(result.sweep, console)
            if result.spearman is not None:
                console.print(f"\nSTS-B test ({result.pairs} pairs): Spearman x100 of cosine vs gold = {result.spearman:.2f}",
                              markup=False)
            elif result.exit_code == 3:
                console.print(f"\nstrict policy: {len(result.reasons)} shard(s) refused to fall back (exit 3); the "
                              f"reasons are above and in the events ({result.sweep.events}).", markup=False)
        if result.exit_code:
            raise typer.Exit(result.exit_code)
