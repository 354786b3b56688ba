"""The model-zoo matrix on a CUDA GPU (marked gpu; skipped without one): every family of
tests/zoo.py and every task it supports, with sdpa and FlashAttention-4, in bfloat16, through
attnfallback's real scoring path, against the float64 truth of what users would otherwise call.

    python -m pytest tests/test_zoo*.py -m gpu -q
    ATTNFALLBACK_ZOO_REPORT=zoo.json python -m pytest tests/test_zoo_gpu.py -m gpu -q   # + the table, as JSON

A cell passes when attnfallback's relative L2 error against the truth (float64 eager on the CPU,
one row per batch) is within twice the error of the same library's own eager run in bfloat16 on
this GPU (never below parity's bf16 floor), or when the implementation is refused with its reasons
(strict policy, exit 3: never a wrong number). Under FlashAttention-4 batches are packed where the
packing check agrees: the packed cell is also run padded (`--packing off`), and both must pass.
FlashAttention-4 cells skip, with the reason, where flash_attn_4 is not importable or transformers
has no flash_attention_4. Needs sentence-transformers >= 6.0 and transformers >= 5.17.
"""

from __future__ import annotations

import os

import pytest

import zoo

pytestmark = pytest.mark.gpu

IMPLS = ("sdpa", "flash_attention_4")
DTYPE = "bfloat16"
DEVICE = os.environ.get("ATTNFALLBACK_ZOO_DEVICE", "cuda")  # a dry run elsewhere: cpu (bf16 on the CPU)
zoo_report = zoo.report_fixture(DEVICE)
CELLS = [(f.name, t, impl) for f in zoo.FAMILIES.values() for t in f.tasks for impl in IMPLS]
_cells: dict = {}  # (family, task) -> (model_dir, CellReference): built once for both implementations


@pytest.fixture(scope="module")
def gpu_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-gpu")


def fa4_obstacle() -> str | None:
    from attnfallback.caps import probe_software

    caps = probe_software()
    if caps.flash_attn_4 is None:
        return "flash_attn_4 is not importable (package flash-attn-4, module flash_attn.cute)"
    if caps.transformers_attn is not None and "flash_attention_4" not in caps.transformers_attn:
        return f"transformers {caps.transformers} has no flash_attention_4"
    return None


def cell(family, task, root):
    key = (family.name, task)
    if key not in _cells:
        model_dir = zoo.build(family, task, root / f"{family.name}-{task}", shape="gpu")
        truth = zoo.reference(task, model_dir, "float64", "cpu")
        eager = zoo.reference(task, model_dir, DTYPE, DEVICE)
        error = zoo.errors(eager, truth)["rel_l2"]
        _cells[key] = (model_dir, zoo.CellReference(truth, error, zoo.bar(error, DTYPE), DTYPE))
    return _cells[key]


@pytest.mark.parametrize("name,task,impl", CELLS, ids=[f"{n}-{t}-{i}" for n, t, i in CELLS])
def test_gpu_family_task_matches_the_reference(name, task, impl, gpu_root, zoo_report):
    family = zoo.FAMILIES[name]
    why = zoo.transformers_cannot(family, task) or (fa4_obstacle() if impl == "flash_attention_4" else None)
    if why:
        zoo_report.add(family=name, task=task, impl=impl, dtype=DTYPE, device=DEVICE, status="skipped", note=why)
        pytest.skip(why)
    model_dir, ref = cell(family, task, gpu_root)
    work = gpu_root / f"{name}-{task}-runs"
    row, out = zoo.check_impl(family, task, impl, model_dir, work, ref, device=DEVICE)
    zoo_report.add(**row)
    if row["status"] == "unavailable":
        # refused with its reasons (strict: exit 3), never a number; the table says why
        assert row["note"], row
        return
    assert row["status"] == "pass", row
    if row.get("packing") == "on":
        padded_row, padded = zoo.check_impl(family, task, impl, model_dir, work, ref, device=DEVICE, packing="off",
                                            label=f"{impl} (padded)")
        zoo_report.add(**padded_row)
        assert padded_row["status"] == "pass", padded_row
        assert zoo.errors(out, padded)["rel_l2"] <= ref.bar  # packed against padded
