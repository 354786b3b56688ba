"""bench/score_throughput.py runs end to end on the CPU with the embedded model: the diagnostic
variants exist and account for every row, and --growth scores each size through run_score. Only
the bookkeeping is asserted; the speeds are what bench/NOTES.md records from real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "score_throughput.py"


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--model", "default", "--data", "synthetic",
                           "--mean-words", "8", "--repeats", "1", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_variants_and_bounds_are_measured_side_by_side(tmp_path):
    out = tmp_path / "variants.json"
    done = run_script("--texts", "60", "--impls", "sdpa,eager", "--attention-bound", "--prepared-ahead",
                      "--switch-intervals", "0.001", "--compare-tokenizer-thread", "--skip", "st-encode-bs32,st-encode-bs256", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    names = set(result["tokens_per_s"])
    assert {"attnfallback-score [sdpa]", "attnfallback-score [eager]", "attnfallback-score [prepared ahead] [sdpa]",
            "attnfallback-score [switch interval 1 ms] [sdpa]", "attnfallback-score [tokenizer in a thread] [sdpa]",
            "forward-only-sorted [no attention, padded]",
            "forward-only-sorted [no attention, packed]", "hf-sorted-budget", "hf-dataset-order-bs32"} <= names
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert result["packing"] == {"sdpa": "off (sdpa has no varlen path)", "eager": "off (eager has no varlen path)"}
    assert result["tokenizer"] == "in the worker thread"
    assert "forward-only-sorted [no attention, padded]" in done.stdout  # names printed whole, not eaten as markup


def test_growth_scores_each_size_end_to_end(tmp_path):
    out = tmp_path / "growth.json"
    done = run_script("--texts", "90", "--growth", "30,90", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "growth" and sorted(int(k) for k in result["sizes"]) == [30, 90]
    small, large = result["sizes"]["30"], result["sizes"]["90"]
    assert 0 < small["tokens"] < large["tokens"] and small["tokens_per_s"] > 0
    assert result["max_over_min"] >= 1.0
    too_many = run_script("--texts", "20", "--growth", "30")
    assert too_many.returncode != 0 and "--growth 30 needs --texts >= 30" in too_many.stderr


def test_growth_variants_run_in_turn_and_set_the_first_parts_pieces(tmp_path):
    out = tmp_path / "variants.json"
    done = run_script("--texts", "200", "--growth", "100,200", "--variants", "lead=whole;lead=8-4-2,floor=16", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    tables = json.loads(out.read_text())["variants"]
    assert set(tables) == {"lead=whole", "lead=8-4-2,floor=16"}
    for table in tables.values():
        assert sorted(int(k) for k in table["sizes"]) == [100, 200] and table["max_over_min"] >= 1.0
    bad = run_script("--texts", "20", "--growth", "20", "--variants", "lead=eighth")
    assert bad.returncode != 0 and "lead=whole|N-N-..., found 'lead=eighth'" in bad.stderr


def test_variant_settings_reach_the_scorer():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from score_throughput import apply_variant, parse_variants
    finally:
        sys.path.remove(str(REPO / "bench"))
    from types import SimpleNamespace

    from attnfallback.scoring import pipeline
    from attnfallback.batching import plan_batches

    assert parse_variants("lead=8-4-2,floor=16;lead=whole;planner=greedy") == [
        {"lead": "8-4-2", "floor": 16}, {"lead": "whole"}, {"planner": "greedy"}]
    scorer = SimpleNamespace(on_cuda=True, batch_tokens=1024, floor_tokens=None, overhead_tokens=None, lead_fractions=())
    apply_variant(scorer, {"lead": "8-4-2", "floor": 16, "overhead": 0})
    assert scorer.lead_fractions == (1 / 8, 1 / 4, 1 / 2) and scorer.floor_tokens == 64 and scorer.overhead_tokens == 0
    apply_variant(scorer, {"planner": "greedy"})
    try:
        assert scorer.lead_fractions == pipeline.LEAD_FRACTIONS and pipeline.plan_batches is not plan_batches
    finally:
        apply_variant(scorer, {})
    assert pipeline.plan_batches is plan_batches and scorer.floor_tokens is None


def test_memory_script_scores_every_row_and_reads_the_child_peak(tmp_path):
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "score_memory.py"), "--rows", "50", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["rows_in"] == result["rows_written"] == 50 and result["rows_skipped"] == 0
    assert result["peak_rss_kb"] > 10_000  # a Python with torch loaded: tens of MB at least


def test_record_imports_lists_what_a_shard_imported(tmp_path):
    """bench/record_imports.py: a shard's modules, written where --out says, model families left out."""
    out = tmp_path / "modules.txt"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "record_imports.py"), "--device", "cpu", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = out.read_text().splitlines()
    assert names[0].startswith("#")
    assert {"torch", "transformers.modeling_utils", "attnfallback.scoring.pipeline", "tokenizers"} <= set(names)
    assert not [n for n in names if n.startswith("transformers.models.qwen2.")]


def test_import_chains_names_who_pulled_a_package_in(tmp_path):
    """A real `-X importtime` trace: the chain ends at the package's first module and starts at a
    top-level import of the process; a package never imported is said to be so."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import import_chains
    finally:
        sys.path.pop(0)
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import json.decoder"], capture_output=True, text=True,
                          timeout=60)
    entries = import_chains.parse(done.stderr)
    result = import_chains.report(entries, ["json", "no_such_package"])
    chain = result["packages"]["json"]["chain"]
    assert chain[0] in {e["name"] for e in entries if e["depth"] == 0} and chain[-1].startswith("json")
    assert result["packages"]["no_such_package"] is None
    synthetic = ("import time:       10 |         10 |     c\n"
                 "import time:    20000 |      20010 |   b\n"
                 "import time:        5 |          5 |   other\n"
                 "import time:      100 |      20115 | a\n")
    entries = import_chains.parse(synthetic)
    assert import_chains.chain(entries, 0) == ["a", "b", "c"]
    assert import_chains.report(entries, ["b"])["packages"]["b"] == {"chain": ["a", "b"], "modules": 1, "first_import_s": 0.02}


def test_end_to_end_sees_a_compile_process_until_it_ends():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import end_to_end
    finally:
        sys.path.pop(0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "attnfallback.fused_ops"])
    try:
        import time

        deadline = time.monotonic() + 10
        while child.pid not in end_to_end.compile_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in end_to_end.compile_processes()
    finally:
        child.kill()
        child.wait()
    assert child.pid not in end_to_end.compile_processes()


def test_end_to_end_warms_the_machine_once_before_any_timed_process(tmp_path):
    out = tmp_path / "e2e.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "end_to_end.py"), "--device", "cpu", "--models", "default",
                           "--rows", "20", "--variants", "ours-sdpa", "--machine-warm-up", "on", "--workdir", str(tmp_path / "w"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["machine_warm_up"]["model"] == "default" and report["machine_warm_up"]["exit"] == 0
    lines = done.stderr.splitlines()
    warm = next(i for i, line in enumerate(lines) if line.startswith("machine warm-up"))
    timed = next(i for i, line in enumerate(lines) if line.startswith("default 20 ours-sdpa"))
    assert warm < timed and sum(line.startswith("machine warm-up") for line in lines) == 1
    assert report["models"]["default"]["sizes"]["20"]["runs"]["ours-sdpa"]["rows_written"] == 20


def test_end_to_end_runs_the_default_beside_one_without_the_kernel_warm_up_and_compares_them(tmp_path):
    out = tmp_path / "e2e.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "end_to_end.py"), "--device", "auto", "--models", "default",
                           "--rows", "20", "--variants", "ours-default,ours-nowarm", "--machine-warm-up", "off",
                           "--workdir", str(tmp_path / "w"), "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    cell = json.loads(out.read_text())["models"]["default"]["sizes"]["20"]
    nowarm, default = cell["runs"]["ours-nowarm"], cell["runs"]["ours-default"]
    assert nowarm["rows_written"] == default["rows_written"] == 20
    assert "warmup_wait_s" in default["phases"] and "warmup_wait_s" not in nowarm["phases"]  # the switch reached the shard
    assert cell["summary"]["default_vs_nowarm_time"] == round(default["wall_s"] / nowarm["wall_s"], 3)
    assert "no kernel warm-up (ATTNFALLBACK_KERNEL_WARMUP=off)" in done.stdout


def test_loop_levers_runs_every_variant_and_says_what_each_changed(tmp_path):
    out = tmp_path / "levers.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "loop_levers.py"), "--device", "cpu", "--layers", "1", "--docs", "60",
                           "--profile-docs", "10", "--kernels", "torch", "--repeats", "1", "--scales", "4", "--budgets", "",
                           "--workdir", str(tmp_path / "w"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["variants"]) == ["base", "aligned", "shipped", "aligned-cuts-x4"]
    assert report["variants"]["aligned"]["align"] == 64 and report["variants"]["base"]["align"] == 1
    assert all(len(report["loop_s"][n]) == 1 and report["tokens_per_s"][n] > 0 for n in report["variants"])
    # cut 4x finer, the same documents pad less in more batches; the head padded to 30,528 outputs changes no sum
    assert report["padding"]["aligned-cuts-x4"]["batches"] > report["padding"]["aligned"]["batches"]
    assert report["padding"]["aligned-cuts-x4"]["padding"] < report["padding"]["aligned"]["padding"]
    assert report["vocab"] == 30522 and report["aligned_max_difference"] < 1e-3
    assert report["profile_base"]["total_ms"] > 0 and report["profile_shipped"]["top"]


def test_shard_profile_writes_the_profile_at_the_command_lines_exit_and_reads_its_tree(tmp_path):
    """`run` keeps the command's exit code and writes the profile although the command line leaves
    through os._exit; `report` finds a root by name and its callees under it."""
    prof = tmp_path / "probe.prof"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "shard_profile.py"), "run", "--prof", str(prof), "--",
                           "probe", "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["device"]
    assert "profile hook was replaced" not in done.stderr
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "shard_profile.py"), "run", "--prof", str(tmp_path / "bad.prof"),
                          "--", "no-such-command"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and (tmp_path / "bad.prof").exists()
    out = tmp_path / "tree.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "shard_profile.py"), "report", str(prof), "--roots",
                           "main,no_such_function", "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    roots = json.loads(out.read_text())["roots"]
    assert roots["no_such_function"] is None
    assert roots["main"]["s"] > 0 and roots["main"]["callees"]
    assert all(c["s"] <= roots["main"]["s"] + 1e-3 for c in roots["main"]["callees"])


def test_spy_report_splits_sampled_stacks_by_thread_root_and_import(tmp_path):
    """py-spy's raw stacks: seconds per thread, a root's callees under it (a recursion counted once),
    and an import's seconds under the outermost module imported and the innermost one running."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import spy_report
    finally:
        sys.path.pop(0)
    boot = "_call_with_frames_removed (<frozen importlib._bootstrap>:488)"
    main = 'process 7:"python -m attnfallback.cli.app score"'
    raw = tmp_path / "spy.txt"
    raw.write_text("\n".join([
        f"{main};thread (7): MainThread;<module> (attnfallback/cli/app.py:1);run_score (attnfallback/scoring/job.py:5);"
        f"read_facts (attnfallback/model_facts.py:9);{boot};<module> (transformers/__init__.py:1);{boot};"
        "<module> (torch/distributed/tensor/__init__.py:3) 30",
        f"{main};thread (7): MainThread;<module> (attnfallback/cli/app.py:1);run_score (attnfallback/scoring/job.py:5);"
        "walk (x/y.py:2);walk (x/y.py:2);forward (x/z.py:4) 10",
        f"{main};thread (9): attnfallback-background;_warm_device (attnfallback/scoring/job.py:40);{boot};<module> (torch/__init__.py:1) 20",
        "not a sample line",
        "",
    ]))
    data = spy_report.report(spy_report.load(str(raw)), rate=100, roots=["run_score", "walk", "absent"], depth=3)
    assert data["threads_s"] == {"process 7 / thread (7): MainThread": 0.4, "process 7 / thread (9): attnfallback-background": 0.2}
    tree = data["roots"]["run_score"]
    assert tree["s"] == 0.4 and "absent" not in data["roots"]
    assert tree["callees"]["read_facts (attnfallback.model_facts)"]["s"] == 0.3
    assert data["roots"]["walk"] == {"s": 0.1, "callees": {"forward (x.z)": {"s": 0.1, "callees": {}}}}
    # the script's own module is not an import; transformers is the outermost, torch.distributed the innermost
    assert data["imports_outermost_s"] == {"transformers": 0.3, "torch": 0.2}
    assert data["imports_own_s"] == {"torch.distributed": 0.3, "torch": 0.2}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "spy_report.py"), str(tmp_path / "missing.txt"), "--rate", "100"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot read" in done.stderr
