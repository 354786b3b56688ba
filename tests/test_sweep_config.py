"""Sweep configuration: the grid, names and run ids, placement, and every kind of bad input."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest

from attnfallback.cli.app import main
from attnfallback.errors import ConfigError
from attnfallback.scoring import ScoreJob
from attnfallback.sweep.config import load_config, parse_config
from attnfallback.sweep.local import Worker, job_env, plan_workers
from attnfallback.sweep.state import claim_output


@pytest.fixture()
def texts(tmp_path) -> Path:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": f"sentence {i}"}) + "\n" for i in range(5)))
    return path


def write_toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(body)
    return path


def test_single_configuration_relative_paths_and_jobs(tmp_path, texts):
    path = write_toml(tmp_path, f"""
output = "out"
shards = 3
workers = 2
model = "default"
input = "{texts.name}"
text_column = "text"
prefer = "flash_attention_2, sdpa"
""")
    config = load_config(path)
    assert config.output == tmp_path / "out"
    assert config.events == tmp_path / "out" / "events"
    (spec,) = config.specs
    assert spec.name == "main" and spec.input == str(texts) and spec.prefer == ("flash_attention_2", "sdpa")
    jobs = config.jobs("run-1")
    assert [str(j.shard) for j in jobs] == ["0/3", "1/3", "2/3"]
    assert {j.run_id for j in jobs} == {"run-1"}
    assert len({j.output for j in jobs}) == 3
    job = jobs[1].score_job(device="cpu")
    assert job == ScoreJob(model="default", input=str(texts), output=str(jobs[1].output), task="embed", text_column="text",
                           shard="1/3", prefer=["flash_attention_2", "sdpa"], policy="graceful", dtype="auto", device="cpu",
                           events=str(config.events), run_id="run-1", quiet=True)
    assert not job.resume and jobs[1].score_job(resume=True).resume
    # the job's process reads it from a file beside its log and writes its result beside it too
    path = jobs[1].write_job_file(device="cpu", resume=True)
    assert path == tmp_path / "out" / "main" / "logs" / "1-of-3.job.json"
    assert ScoreJob.from_dict(json.loads(path.read_text())) == replace(job, resume=True)
    assert jobs[1].score_args() == ["score", "--job", str(path), "--result", str(path.with_name("1-of-3.result.json"))]


def test_grid_multiplies_models_inputs_policies_each_with_its_own_run_id(tmp_path, texts):
    other = tmp_path / "other.jsonl"
    other.write_text(texts.read_text())
    path = write_toml(tmp_path, f"""
output = "out"
shards = 2
input = "{texts.name}"
[grid]
input = ["{texts.name}", "{other.name}"]
policy = ["graceful", "strict"]
""")
    config = load_config(path)
    names = [s.name for s in config.specs]
    assert names == ["texts.graceful", "texts.strict", "other.graceful", "other.strict"]
    jobs = config.jobs("sweep-7")
    assert len(jobs) == 8
    run_ids = {j.run_id for j in jobs}
    assert run_ids == {f"sweep-7.{n}" for n in names}
    # (run id, shard) identifies every job
    assert len({(j.run_id, str(j.shard)) for j in jobs}) == 8


def test_explicit_configs_override_the_defaults(tmp_path, texts):
    config = parse_config({
        "output": "out", "input": str(texts), "shards": 2,
        "configs": [{"name": "a"}, {"name": "b", "shards": 3, "policy": "strict"}],
    }, base=tmp_path)
    a, b = config.specs
    assert (a.name, a.shards, a.policy) == ("a", 2, "graceful")
    assert (b.name, b.shards, b.policy) == ("b", 3, "strict")
    assert len(config.jobs("r")) == 5


@pytest.mark.parametrize("body, key, fragment", [
    ('output = "o"\ninput = "{t}"\nshard = 2\n', "shard", "valid keys:"),
    ('output = "o"\ninput = "{t}"\n[grid]\nmodels = ["default"]\n', "models", "valid keys:"),
    ('output = "o"\ninput = "{t}"\n[[configs]]\nname = "x"\nworkers = 2\n', "workers", "valid keys:"),
    ('output = "o"\ninput = "missing.csv"\n', "input", "not found"),
    ('output = "o"\n', "input", "missing key 'input'"),
    ('input = "{t}"\n', "output", "missing key 'output'"),
    ('output = "o"\ninput = "{t}"\nshards = 0\n', "shards", ">= 1"),
    ('output = "o"\ninput = "{t}"\nshards = "four"\n', "shards", "an integer"),
    ('output = "o"\ninput = "{t}"\npolicy = "lenient"\n', "policy", "graceful"),
    ('output = "o"\ninput = "{t}"\nprefer = ["flash_attention_9"]\n', "prefer", "sdpa"),
    ('output = "o"\ninput = "{t}"\ntask = "rank"\n', "task", "embed"),
    ('output = "o"\ninput = "{t}"\ndevices = "gpu"\n', "devices", '"auto"'),
    ('output = "o"\ninput = "{t}"\nworkers = 0\n', "workers", ">= 1"),
    ('output = "o"\ninput = "{t}"\n[grid]\npolicy = "strict"\n', "policy", "non-empty list"),
    ('output = "o"\ninput = "{t}"\npacking = "always"\n', "packing", "unknown value 'always'; valid: auto, off"),
    ('output = "o"\ninput = "{t}"\npacking = false\n', "packing", "auto | off"),
    ('output = "o"\ninput = "{t}"\ntokenizer_process = "thread"\n', "tokenizer_process", "unknown value 'thread'; valid: auto, off"),
    ('output = "o"\ninput = "{t}"\n[grid]\nmeasure = ["on", "sometimes"]\n', "measure", "unknown measure mode 'sometimes'; valid: auto, on, off"),
])
def test_bad_configurations_name_the_key(tmp_path, texts, body, key, fragment):
    path = write_toml(tmp_path, body.format(t=texts.name))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.exit_code == 2


def test_unknown_key_lists_the_valid_ones(tmp_path, texts):
    path = write_toml(tmp_path, f'output = "o"\ninput = "{texts.name}"\nshard = 2\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'shard'" in message
    for valid in ("shards", "workers", "devices", "prefer", "policy"):
        assert valid in message


def test_toml_syntax_error_is_bad_input(tmp_path, capsys):
    path = write_toml(tmp_path, 'output = "o\n')
    assert main(["sweep", str(path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_missing_configuration_file_exits_2(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml not found" in capsys.readouterr().err


def test_cli_unknown_key_exits_2(tmp_path, texts, capsys):
    path = write_toml(tmp_path, f'output = "o"\ninput = "{texts.name}"\nmodle = "default"\n')
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'modle'" in err and "model" in err


def test_output_directory_of_another_run_is_refused(tmp_path, texts):
    base = {"output": str(tmp_path / "out"), "input": str(texts)}
    first = claim_output(parse_config({**base, "run_id": "run-a"}), resume=False, engine="local")
    assert first.run_id == "run-a" and (tmp_path / "out" / "sweep.json").is_file()
    # the same run without --resume, another run with or without it: refused, exit 2
    for run_id, resume in (("run-a", False), ("run-b", False), ("run-b", True), (None, False)):
        with pytest.raises(ConfigError) as info:
            claim_output(parse_config({**base, "run_id": run_id} if run_id else base), resume=resume, engine="local")
        assert "run-a" in str(info.value) and info.value.exit_code == 2
    # --resume with the same run id, or with none (taken from the manifest): accepted
    assert claim_output(parse_config({**base, "run_id": "run-a"}), resume=True, engine="local").run_id == "run-a"
    assert claim_output(parse_config(base), resume=True, engine="local").run_id == "run-a"


def test_a_new_run_never_appends_to_an_earlier_runs_events(tmp_path, texts):
    events = tmp_path / "events"
    (events / "run-a").mkdir(parents=True)
    (events / "run-a" / "0-of-1.jsonl").write_text("{}\n")
    config = parse_config({"output": str(tmp_path / "fresh"), "events": str(events), "input": str(texts), "run_id": "run-a"})
    with pytest.raises(ConfigError, match="already holds events of run 'run-a'") as info:
        claim_output(config, resume=False, engine="local")
    assert info.value.key == "run_id" and not (tmp_path / "fresh").exists()


def test_resume_refuses_a_changed_configuration(tmp_path, texts):
    base = {"output": str(tmp_path / "out"), "input": str(texts), "run_id": "r"}
    claim_output(parse_config({**base, "shards": 2}), resume=False, engine="local")
    with pytest.raises(ConfigError, match="shards differ"):
        claim_output(parse_config({**base, "shards": 3}), resume=True, engine="local")


def test_non_empty_directory_without_manifest_is_refused(tmp_path, texts):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.parquet").write_bytes(b"someone else's")
    with pytest.raises(ConfigError, match="not empty"):
        claim_output(parse_config({"output": str(out), "input": str(texts)}), resume=True, engine="local")


def test_placement_gpus_else_cpu_workers(tmp_path, texts):
    base = {"output": "o", "input": str(texts), "shards": 4}
    auto = parse_config({**base, "workers": 2}, base=tmp_path)
    gpus = plan_workers(auto, gpus=["0", "1", "2"])
    assert [(w.device, w.visible) for w in gpus] == [("cuda", "0"), ("cuda", "1"), ("cuda", "2")]
    cpus = plan_workers(auto, gpus=[], cpu_count=2)
    assert [(w.device, w.visible, w.threads) for w in cpus] == [("cpu", "", 1), ("cpu", "", 1)]
    assert len(plan_workers(parse_config({**base, "devices": "cpu"}, base=tmp_path), gpus=["0"], cpu_count=8)) == 4
    listed = plan_workers(parse_config({**base, "devices": [1, 3]}, base=tmp_path), gpus=[])
    assert [w.visible for w in listed] == ["1", "3"]


def test_job_environment_isolates_devices_and_identity(tmp_path, texts):
    config = parse_config({"output": "o", "input": str(texts), "shards": 2}, base=tmp_path)
    job = config.jobs("r")[1]
    env = job_env(Worker("gpu3", "cuda", "3"), job, base={"ATTNFALLBACK_RUN_ID": "stale", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["ATTNFALLBACK_RUN_ID"] == "r" and env["ATTNFALLBACK_SHARD"] == "1/2"
    cpu = job_env(Worker("cpu0", "cpu", "", 1), job, base={})
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["OMP_NUM_THREADS"] == "1"


def test_a_saved_dataset_directory_is_an_input_and_an_empty_id_column_is_passed_on(tmp_path):
    import pyarrow as pa

    from scoring_helpers import save_like_datasets

    save_like_datasets(tmp_path / "eval-set", pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]))
    config = parse_config({"output": "out", "input": "eval-set", "id_column": "", "shards": 2}, base=tmp_path)
    (spec,) = config.specs
    assert spec.input == str(tmp_path / "eval-set")
    job_file = config.jobs("run-1")[0].write_job_file(device="cpu")
    # the row number, even if the input grows an `id` column
    assert json.loads(job_file.read_text())["id_column"] == ""


def test_packing_tokenizer_process_and_measure_reach_each_shards_job(tmp_path, texts):
    path = write_toml(tmp_path, f"""
output = "out"
input = "{texts.name}"
shards = 2
packing = "off"
[grid]
measure = ["off", "on"]
[[configs]]
name = "a"
tokenizer_process = "off"
[[configs]]
name = "b"
""")
    config = load_config(path)
    settings = {s.name: (s.packing, s.tokenizer_process, s.measure) for s in config.specs}
    assert settings == {"a.off": ("off", "off", "off"), "a.on": ("off", "off", "on"),
                        "b.off": ("off", "auto", "off"), "b.on": ("off", "auto", "on")}
    for job in config.jobs("r"):
        written = ScoreJob.from_dict(json.loads(job.write_job_file(device="cpu").read_text()))
        assert (written.packing, written.tokenizer_process, written.measure) == settings[job.spec.name]
    plain = parse_config({"output": "o", "input": str(texts)}).jobs("r")[0].score_job()
    assert (plain.packing, plain.tokenizer_process, plain.measure) == ("auto", "auto", None)  # the job's defaults


def test_every_field_a_spec_shares_with_the_job_reaches_the_job(tmp_path, texts):
    # JobSpec.score_job goes by the field names: a field added to both is carried without more code
    from attnfallback.sweep.config import JobSpec

    config = parse_config({"output": "o", "input": str(texts), "model": "m", "revision": "abc", "task": "pairs",
                           "text_columns": ["a", "b"], "id_column": "key", "policy": "strict", "prefer": ["sdpa"],
                           "dtype": "float16", "batch_tokens": 512, "max_length": 64, "on_bad_row": "skip",
                           "on_nonfinite": "flag", "trust_remote_code": True, "allow_new_head": True, "part_rows": 32,
                           "packing": "off", "tokenizer_process": "off", "measure": "off", "text_column": "a"}, base=tmp_path)
    (spec,) = config.specs
    job = config.jobs("r")[0].score_job()
    shared = {f.name for f in fields(JobSpec)} & {f.name for f in fields(ScoreJob)}
    defaults = ScoreJob()
    for name in shared:
        value = getattr(spec, name)
        assert getattr(job, name) == (list(value) if isinstance(value, tuple) else value), name
        assert getattr(job, name) != getattr(defaults, name), f"{name}: set to a value other than the default above"
    assert job.trust_remote_code is True and job.allow_new_head is True  # the job file carries them
    assert shared | {"output", "shard", "device", "events", "run_id", "resume", "quiet", "first_part_rows"} == {
        f.name for f in fields(ScoreJob)}
    assert set(f.name for f in fields(JobSpec)) - shared == {"name", "shards"}


def test_the_manifest_names_the_newer_keys_only_when_set_so_older_manifests_still_resume(tmp_path, texts):
    base = {"output": str(tmp_path / "out"), "input": str(texts), "run_id": "r"}
    (spec,) = parse_config(base).specs
    recorded = spec.to_dict()
    for key in ("allow_new_head", "packing", "tokenizer_process", "measure"):
        assert key not in recorded
    state = claim_output(parse_config(base), resume=False, engine="local")
    manifest = json.loads(state.path.read_text())
    assert "packing" not in manifest["config"]["configs"][0]
    # a manifest written before the keys existed compares equal to the same configuration today
    assert claim_output(parse_config(base), resume=True, engine="local").run_id == "r"
    (changed,) = parse_config({**base, "packing": "off", "measure": "on"}).specs
    assert changed.to_dict()["packing"] == "off" and changed.to_dict()["measure"] == "on"
    with pytest.raises(ConfigError, match="measure, packing differ"):
        claim_output(parse_config({**base, "packing": "off", "measure": "on"}), resume=True, engine="local")
