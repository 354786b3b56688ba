"""plan -> from_pretrained(chosen) -> verify -> next candidate on failure -> Decision.

The weights are read once: the plan rejects what cannot run before loading, and a candidate that
fails at verification (some failures only show at the first forward: transformers checks no
compute capability for flash_attention_2) is replaced in place with `set_attn_implementation`.
dtype and revision stay fixed across attempts. Every attempt is kept, with its reasons, for the
error, the log and the `attn_impl` audit event.

A failure that is not the attention's is not reported as one: a device that is not there is
refused by the probe, a checkpoint without the weights of the model built from it by `heads`, and
a load that fails the same way under every implementation tried is a ModelLoadError.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from attnfallback import envs, fastest, impls, planner, verify
from attnfallback.caps import DeviceCaps, SoftwareCaps, probe_device, probe_software
from attnfallback.decision import Attempt, Decision
from attnfallback.errors import AttentionUnavailable, CheckpointError, ModelLoadError, UsageError, is_fatal_device_error
from attnfallback.events import open_sink, set_default_sink
from attnfallback.heads import check_loaded
from attnfallback.kernels_seen import attention_kernels
from attnfallback.model_facts import ModelFacts, ModelRef, read_facts, resolve_ref
from attnfallback.policy import Mode, Policy, as_policy
from attnfallback.sdpa_order import describe as sdpa_order_note
from attnfallback.verify import RECOVERABLE, first_line, torch_dtype
from attnfallback.version import __version__

log = logging.getLogger("attnfallback")


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on its device) and how it was chosen."""

    model: Any
    decision: Decision
    facts: ModelFacts
    device: Any  # torch.device
    sink: Any = None  # the EventSink this load wrote to, if any
    _tokenizer: Any = None

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded on first use from the same place and revision."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.facts.ref)
        return self._tokenizer

    def adopt_tokenizer(self, tokenizer) -> None:
        """Use `tokenizer` (one the caller already read from the same place) unless one is loaded."""
        if self._tokenizer is None and tokenizer is not None:
            self._tokenizer = tokenizer


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if ref.source == "hub":
        kwargs["revision"] = ref.revision
    else:
        kwargs["local_files_only"] = True
    return AutoTokenizer.from_pretrained(ref.location, **kwargs)


def versions(software: SoftwareCaps) -> dict:
    """The versions an event records: ours, torch's, transformers', the flash packages', CUDA's."""
    return {
        "attnfallback": __version__,
        "torch": software.torch,
        "transformers": software.transformers,
        "flash_attn": software.flash_attn,
        "flash_attn_3": software.flash_attn_3,
        "flash_attn_4": software.flash_attn_4,
        "cuda": software.cuda,
    }


def from_pretrained(facts: ModelFacts, auto_class: str, impl: str, dtype: str, trust_remote_code: bool, model_kwargs: dict,
                    allow_new_head: bool = False, task: str | None = None):
    """One read of the weights, with the implementation, dtype and revision fixed; refused
    (NewHeadError) when the checkpoint lacks weights of the model built, unless `allow_new_head`."""
    import transformers

    auto = getattr(transformers, auto_class)
    kwargs = dict(model_kwargs)
    if facts.config is not None and "config" not in kwargs:
        # read once, in read_facts; keyword arguments naming config attributes (num_labels) go onto
        # it, as transformers does when it reads the config itself (passed with config=, they would
        # reach the model's __init__ and fail)
        config = copy.copy(facts.config)
        for key in [k for k in kwargs if hasattr(config, k)]:
            setattr(config, key, kwargs.pop(key))
        kwargs["config"] = config
    kwargs.update(dtype=torch_dtype(dtype), attn_implementation=impl, trust_remote_code=trust_remote_code)
    if facts.ref.source == "hub":
        kwargs["revision"] = facts.revision
    else:
        kwargs["local_files_only"] = True
    model, info = auto.from_pretrained(facts.ref.location, output_loading_info=True, **kwargs)
    check_loaded(model, info, model_id=facts.model_id, auto_class=auto_class, task=task, allow_new_head=allow_new_head)
    return model


def _measures(policy: Policy, device: DeviceCaps, bench_factory, viable: list[str]) -> bool:
    """Whether this load chooses by measurement (fastest.py): always under `fastest`; under
    graceful with measure=auto on a CUDA GPU (measure=on: any device), when the caller can run
    its own work and more than one candidate is viable; never under strict."""
    if policy.mode is Mode.FASTEST:
        return True
    wanted = policy.measure == "on" or (policy.measure == "auto" and device.kind == "cuda")
    return policy.mode is Mode.GRACEFUL and wanted and bench_factory is not None and len(viable) > 1


def _loading_order(candidates, measuring: bool) -> list:
    """The plan's order; when measuring, the viable candidates that compile go last, so the
    weights are loaded and verified without paying a compile the measurement may not choose."""
    if not measuring:
        return list(candidates)
    compiles = {c.impl for c in candidates if c.viable and c.impl in impls.REGISTRY and impls.REGISTRY[c.impl].compiles}
    return [c for c in candidates if c.impl not in compiles] + [c for c in candidates if c.impl in compiles]


def enable_flash_kernel_cache(env=None) -> str | None:
    """Point FlashAttention-4's on-disk kernel cache at <cache directory>/flash-kernels, so a
    shard reuses the kernels an earlier process on this machine (or shared storage) compiled,
    unless the user set FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED or $ATTNFALLBACK_FLASH_KERNEL_CACHE
    is `off`. Read by flash_attn.cute when first imported: a no-op once it is. Returns the directory."""
    env = os.environ if env is None else env
    if envs.choice(envs.FLASH_KERNEL_CACHE, ("on", "off"), "on", env) == "off" or "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED" in env:
        return env.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
    directory = str(envs.cache_directory(env=env) / "flash-kernels")
    env["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] = "1"
    env.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", directory)
    return env["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"]


KERNELS_SCHEMA = "attnfallback.kernels/1"


def kernels_key(decision: Decision) -> dict:
    """What the verification forward's kernels depend on: the same key traces the same kernels."""
    device = decision.device
    return {
        "schema": KERNELS_SCHEMA,
        "gpu_class": device.gpu_class or device.name or device.kind,
        "cc": device.cc_text,
        "model": decision.facts.identity,
        "model_class": decision.facts.model_class,
        "dtype": decision.dtype,
        "used": decision.used,
        "versions": dict(sorted(decision.versions.items())),
        "sdpa_order": sdpa_order_note(),
    }


def kernels_traced_or_cached(decision: Decision, trace, directory=None) -> tuple[list[str] | None, str]:
    """The attention kernels of the verification forward: (labels, "cache") when an earlier process
    traced them under the same key in the cache directory, else (trace(), "traced"), kept there for
    the next shard. A trace costs a shard a second forward (and the profiler's start, tenths of a second, when a flash
    package launches its kernels outside the dispatcher; kernels_seen.py)."""
    directory = envs.cache_directory(directory)
    key = kernels_key(decision)
    path = directory / f"kernels-{fastest.key_digest(key)}.json"
    entry = fastest.read_entry(path, key, KERNELS_SCHEMA, what="kernel cache")
    if entry is not None and isinstance(entry.get("labels"), list):
        return [str(label) for label in entry["labels"]], "cache"
    labels = trace()
    if labels is not None:
        fastest.write_atomically(path, {"schema": KERNELS_SCHEMA, "key": key, "labels": labels,
                                        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                                 what="kernel cache")
    return labels, "traced"


def _resolve_device(device: str, device_caps: DeviceCaps | None) -> DeviceCaps:
    return device_caps if device_caps is not None else probe_device(device)


def auto_class_name(auto_class) -> str:
    """An auto class (or model class) of transformers, given as itself or by its name -> its name."""
    if isinstance(auto_class, str):
        return auto_class
    name = getattr(auto_class, "__name__", None)
    import transformers

    if name is None or getattr(transformers, name, None) is not auto_class:
        raise UsageError(f"auto_class must be a transformers auto class (or model class) or its name, found {auto_class!r}")
    return name


BASELINE_IMPLS = ("sdpa", "eager")  # need no kernel package: their failures are rarely theirs


def shared_failure(attempts: list[Attempt]) -> str | None:
    """The failure every implementation that got past the plan met, when it is one and the same
    (the implementation's own name aside) and so not the attention's: eager's, or two or more alike
    with sdpa among them (flash kernels alone may share a failure that is theirs). None otherwise."""
    failed = [a for a in attempts if a.stage != "plan" and not a.ok]
    if not failed or any(a.ok for a in attempts):
        return None
    texts = {"; ".join(a.reasons).replace(a.impl, "<impl>") for a in failed}
    impls = {a.impl for a in failed}
    if len(texts) == 1 and ("eager" in impls or (len(failed) > 1 and impls & set(BASELINE_IMPLS))):
        return "; ".join(failed[0].reasons)
    return None


def _open_sink(events, run_id, shard, sink):
    if sink is not None:
        return sink
    opened = open_sink(events, run_id, shard)
    if opened is not None:
        set_default_sink(opened)
    return opened


def plan_reasons(model: str, names: list[str], *, dtype: str, device: str, auto_class: str, revision: str | None = None,
                 trust_remote_code: bool = False) -> tuple[dict[str, list[str]], str]:
    """Reasons each implementation cannot run here (none for viable ones), and the resolved dtype."""
    facts = read_facts(model, revision=revision, auto_class=auto_class, trust_remote_code=trust_remote_code)
    the_plan = planner.plan(facts, probe_device(device), probe_software(), Policy.graceful(names), dtype, enforce_strict=False)
    return {c.impl: list(c.reasons) for c in the_plan.candidates}, the_plan.dtype


def fallback_expected(decision: Decision) -> bool:
    """A fallback nobody needs warning about: no CUDA GPU here, and only GPU-only implementations
    (flash attention, hub kernels) were passed over. Logged at info; the event still says fell_back."""
    return decision.device.kind != "cuda" and all(impls.get(a.impl).gpu_only for a in decision.attempts if not a.ok)


def load_model(
    model: str | os.PathLike = "default",
    *,
    revision: str | None = None,
    auto_class: str | type = "AutoModel",
    dtype: str = "auto",
    device: str = "auto",
    policy: Policy | str | None = None,
    prefer: str | list[str] | None = None,
    events: str | os.PathLike | None = None,
    run_id: str | None = None,
    shard: str | None = None,
    trust_remote_code: bool = False,
    device_caps: DeviceCaps | None = None,
    software_caps: SoftwareCaps | None = None,
    model_kwargs: dict | None = None,
    sink=None,
    allow_new_head: bool = False,
    task: str | None = None,
    bench_factory=None,
    facts: ModelFacts | None = None,
    verify_inputs=None,
) -> LoadedModel:
    """Load `model` with the fastest attention implementation that runs here.

    graceful: the first candidate that plans, loads and verifies; on a CUDA GPU, when
    `bench_factory(loaded)` gives a way to run the caller's own work (`score` gives the shard's
    rows through its own forward) and more than one candidate is viable, the one measured fastest
    (fastest.py: the rule, the budget, the cache). strict: the first preference or
    AttentionUnavailable (an `attn_unavailable` event is written first). fastest: always
    measured. Writes an `attn_impl` event when an events directory is given (or
    $ATTNFALLBACK_EVENTS is set).

    `policy`: a Policy or a mode name; `auto_class`: e.g. "AutoModelForCausalLM" or the class itself.
    A checkpoint without the weights of the model built (a classifier head on an embedding model)
    is a NewHeadError unless `allow_new_head`; `task` only names what needed them in that error.
    `facts`: the model's facts when the caller has read them. `verify_inputs`: what the
    verification forward feeds the model (see verify_forward).
    """
    policy = as_policy(policy, prefer)
    auto_class = auto_class_name(auto_class)
    if facts is None:
        ref = resolve_ref(model, revision)
        facts = read_facts(ref, auto_class=auto_class, trust_remote_code=trust_remote_code)
    dev = _resolve_device(device, device_caps)
    software = software_caps if software_caps is not None else probe_software()
    dtype_name = planner.resolve_dtype(dtype, dev)
    sink = _open_sink(events, run_id, shard, sink)

    the_plan = planner.plan(facts, dev, software, policy, dtype_name, enforce_strict=False)
    attempts: list[Attempt] = []
    decision = Decision(policy.requested, None, attempts, policy, dtype_name, dev, facts, versions(software))

    def fail(extra_attempts_reasons: dict[str, list[str]] | None = None) -> AttentionUnavailable:
        reasons = {a.impl: a.reasons for a in attempts if not a.ok}
        for c in the_plan.candidates:
            if not c.viable:
                reasons.setdefault(c.impl, list(c.reasons))
        err = AttentionUnavailable(policy.requested, reasons, attempts, strict=policy.is_strict)
        if sink is not None:
            fields = decision.to_dict()
            fields.update(used=None, fell_back=True, error=str(err))
            sink.emit("attn_unavailable", **fields)
        return err

    if policy.is_strict and not the_plan.strict_ok:
        attempts.append(Attempt(the_plan.requested, "plan", False, list(the_plan.candidates[0].reasons)))
        raise fail()

    import torch

    viable = [c.impl for c in the_plan.candidates if c.viable]
    measuring = _measures(policy, dev, bench_factory, viable)
    if "flash_attention_4" in viable:
        enable_flash_kernel_cache()
    torch_device = torch.device(dev.torch_device)
    loaded = None
    t_load = t_verify = 0.0
    for cand in _loading_order(the_plan.candidates, measuring):
        if not cand.viable:
            attempts.append(Attempt(cand.impl, "plan", False, list(cand.reasons)))
            continue
        t0 = time.perf_counter()
        try:
            if loaded is None:
                fresh = from_pretrained(facts, auto_class, cand.impl, dtype_name, trust_remote_code, model_kwargs or {},
                                        allow_new_head, task)
                fresh.to(torch_device)
                fresh.eval()
                loaded = fresh  # only once on its device: a failed move leaves nothing half-made behind
            else:
                loaded.set_attn_implementation(cand.impl)
        except RECOVERABLE as e:
            if is_fatal_device_error(e):
                raise
            t_load += time.perf_counter() - t0
            attempts.append(Attempt(cand.impl, "load", False, [f"load failed: {first_line(e)}"]))
            if policy.is_strict:
                raise fail() from e
            continue
        except OSError as e:
            raise CheckpointError(f"cannot load {facts.model_id}: {first_line(e)}", path=facts.ref.location) from e
        except Exception as e:
            if type(e).__module__.startswith("safetensors"):  # a corrupt weight file
                raise CheckpointError(f"cannot read the weights of {facts.model_id}: {first_line(e)}",
                                      path=facts.ref.location) from e
            raise
        t_load += time.perf_counter() - t0
        actual = getattr(loaded.config, "_attn_implementation", None) or cand.impl
        if policy.verify:
            t0 = time.perf_counter()
            reasons = verify.verify_forward(loaded, facts, torch_device, verify_inputs)
            t_verify += time.perf_counter() - t0
            if reasons:
                attempts.append(Attempt(cand.impl, "verify", False, reasons))
                if policy.is_strict:
                    raise fail()
                continue
        stage = "verify" if policy.verify else "load"
        note = [] if actual == cand.impl else [f"transformers runs {actual} for {cand.impl}"]
        attempts.append(Attempt(cand.impl, stage, True, note))
        decision.used = actual
        break

    decision.timing = {"load_s": t_load, "verify_s": t_verify}
    if decision.used is None:
        shared = shared_failure(attempts)
        if shared is not None:
            tried = ", ".join(a.impl for a in attempts if a.stage != "plan")
            raise ModelLoadError(f"{facts.model_id} ({facts.model_class}) failed the same way under every attention "
                                 f"implementation tried ({tried}), so the attention is not the cause: {shared}")
        raise fail()

    result = LoadedModel(model=loaded, decision=decision, facts=facts, device=torch_device, sink=sink)
    if measuring:
        t0 = time.perf_counter()
        bench = bench_factory(result) if bench_factory is not None else None
        if policy.mode is Mode.FASTEST:
            fastest.choose_fastest(result, viable, bench=bench)
        elif bench is not None:  # graceful with nothing of the caller's own to run: the preference order stands
            fastest.choose(result, viable, bench, fastest.Settings(budget_s=None, margin=fastest.GRACEFUL_MARGIN,
                                                                   charge_compiles=True, task=bench.task))
        # a first shard's wait for the fused kernels' compile (bench_factory) is its own figure
        decision.timing["measure_s"] = time.perf_counter() - t0 - decision.timing.get("fused_wait_s", 0.0)
    if torch_device.type == "cuda" and policy.verify:
        t0 = time.perf_counter()
        decision.kernels, decision.kernels_source = kernels_traced_or_cached(
            decision, lambda: attention_kernels(loaded, facts, torch_device))
        decision.timing["kernels_s"] = time.perf_counter() - t0

    if decision.fell_back:
        (log.info if fallback_expected(decision) else log.warning)(
            "attention: requested %s, using %s (%s)", decision.requested, decision.used, decision.first_reason)
    elif decision.used != decision.requested:
        log.info("attention: using %s (%s)", decision.used, decision.choice)
    else:
        log.info("attention: using %s as requested", decision.used)
    if sink is not None:
        sink.emit("attn_impl", **decision.to_dict())
    return result
