"""plan -> from_pretrained(chosen) -> verify -> next candidate on failure -> Decision.

The weights are read once: the plan rejects what cannot run before loading, and a candidate that
fails at verification (some failures only show at the first forward: transformers checks no
compute capability for flash_attention_2) is replaced in place with `set_attn_implementation`.
dtype and revision stay fixed across attempts. Every attempt is kept, with its reasons, for the
error, the log and the `attn_impl` audit event.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from attnfallback import planner
from attnfallback.caps import DeviceCaps, SoftwareCaps, probe_device, probe_software
from attnfallback.errors import AttentionUnavailable, ModelLoadError, is_fatal_device_error
from attnfallback.model_facts import ModelFacts, ModelRef, read_facts, resolve_ref
from attnfallback.policy import Mode, Policy
from attnfallback.sdpa_order import sdpa_order

log = logging.getLogger("attnfallback")

# Errors a GPU class or a missing kernel explains; anything else is not the attention's fault.
RECOVERABLE = (ValueError, ImportError, RuntimeError, NotImplementedError, AssertionError, TypeError)
VERIFY_BATCH = (2, 8)  # two rows of eight tokens; the second row padded, so masks are exercised


@dataclass
class Attempt:
    """One step of the decision: an implementation, the stage it reached, and why it failed."""

    impl: str
    stage: str  # plan | load | verify
    ok: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"impl": self.impl, "stage": self.stage, "ok": self.ok, "reasons": list(self.reasons)}


@dataclass
class Decision:
    """What was requested, what runs, and every attempt on the way."""

    requested: str
    used: str | None
    attempts: list[Attempt]
    policy: Policy
    dtype: str
    device: DeviceCaps
    facts: ModelFacts
    versions: dict
    timing: dict = field(default_factory=dict)
    kernels: list[str] | None = None
    measured: dict | None = None  # fastest policy: tokens/s per implementation

    @property
    def fell_back(self) -> bool:
        """Something other than the first preference runs because the first could not.
        Under `fastest`, a measured choice among runnable candidates is not a fallback."""
        if self.used == self.requested:
            return False
        measured = (self.measured or {}).get("tokens_per_s") or {}
        return self.requested not in measured

    @property
    def first_reason(self) -> str | None:
        for a in self.attempts:
            if not a.ok and a.reasons:
                return f"{a.impl}: {a.reasons[0]}"
        return None

    def to_dict(self) -> dict:
        """The fields of the `attn_impl` event (without the common envelope)."""
        d = {
            "gpu": {
                "name": self.device.name,
                "class": self.device.gpu_class or self.device.kind,
                "cc": self.device.cc_text,
                "memory_gb": None if self.device.memory_gb is None else round(self.device.memory_gb, 1),
            },
            "model": {
                "id": self.facts.model_id,
                "revision": self.facts.revision,
                "identity": self.facts.identity,
                "dtype": self.dtype,
                "architecture": self.facts.architecture,
            },
            "policy": {"mode": self.policy.mode.value, "prefer": list(self.policy.prefer)},
            "requested": self.requested,
            "used": self.used,
            "fell_back": self.fell_back,
            "attempts": [a.to_dict() for a in self.attempts],
            "versions": self.versions,
            "timing": {k: round(v, 4) for k, v in self.timing.items()},
        }
        if self.kernels is not None:
            d["kernels"] = list(self.kernels)
        if self.measured is not None:
            d["measured"] = self.measured
        return d


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


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if ref.source == "hub":
        kwargs["revision"] = ref.revision
    else:
        kwargs["local_files_only"] = True
    return AutoTokenizer.from_pretrained(ref.location, **kwargs)


def versions(software: SoftwareCaps) -> dict:
    from attnfallback import __version__

    return {
        "attnfallback": __version__,
        "torch": software.torch,
        "transformers": software.transformers,
        "flash_attn": software.flash_attn,
        "flash_attn_3": software.flash_attn_3,
        "flash_attn_4": software.flash_attn_4,
        "cuda": software.cuda,
    }


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def from_pretrained(facts: ModelFacts, auto_class: str, impl: str, dtype: str, trust_remote_code: bool, model_kwargs: dict):
    """One read of the weights, with the implementation, dtype and revision fixed."""
    import transformers

    auto = getattr(transformers, auto_class)
    kwargs = dict(model_kwargs)
    kwargs.update(dtype=torch_dtype(dtype), attn_implementation=impl, trust_remote_code=trust_remote_code)
    if facts.config is not None:
        kwargs.setdefault("config", copy.copy(facts.config))  # read once, in read_facts
    if facts.ref.source == "hub":
        kwargs["revision"] = facts.revision
    else:
        kwargs["local_files_only"] = True
    return auto.from_pretrained(facts.ref.location, **kwargs)


def verify_forward(model, facts: ModelFacts, device, inputs_for=None) -> list[str]:
    """A forward pass on a tiny batch; reasons it failed (exception or non-finite output).

    `inputs_for(model, facts) -> (inputs, keep)`: the model's inputs as the caller's own path builds
    them (the scoring task's: pairs with their type ids, its mask form) and the real tokens of its
    outputs; without it, two rows of plain input_ids and attention_mask. Errors it raises (a
    tokenizer that does not match the model) are not the attention's fault: they propagate.
    A CUDA error that leaves the context unusable propagates too: no other candidate can run."""
    import torch

    if inputs_for is None:
        rows, length = VERIFY_BATCH
        vocab = max(facts.vocab_size or 100, 10)
        ids = (torch.arange(rows * length).reshape(rows, length) % (min(vocab, 1000) - 3)) + 3
        mask = torch.ones_like(ids)
        mask[1, length // 2 :] = 0
        inputs, keep = {"input_ids": ids, "attention_mask": mask}, mask.bool()
    else:
        inputs, keep = inputs_for(model, facts)
    try:
        with torch.inference_mode(), sdpa_order(getattr(device, "type", str(device))):
            out = model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()})
    except RECOVERABLE as e:
        if is_fatal_device_error(e):
            raise
        return [f"forward failed: {_first_line(e)}"]
    tensor = None
    for name in ("logits", "last_hidden_state"):
        tensor = getattr(out, name, None)
        if tensor is not None:
            break
    if tensor is None:
        tensor = out[0]
    keep = keep.to(device) if keep is not None else None
    if keep is not None and tensor.dim() >= 2 and tensor.shape[:2] == keep.shape:
        tensor = tensor[keep]
    if not torch.isfinite(tensor.float()).all():
        return ["forward produced non-finite outputs (NaN or inf)"]
    return []


def _resolve_device(device: str, device_caps: DeviceCaps | None) -> DeviceCaps:
    return device_caps if device_caps is not None else probe_device(device)


def _open_sink(events, run_id, shard, sink):
    if sink is not None:
        return sink
    from attnfallback.events import open_sink, set_default_sink

    opened = open_sink(events, run_id, shard)
    if opened is not None:
        set_default_sink(opened)
    return opened


def load_model(
    model: str | os.PathLike = "default",
    *,
    revision: str | None = None,
    auto_class: str = "AutoModel",
    dtype: str = "auto",
    device: str = "auto",
    policy: Policy | None = None,
    events: str | os.PathLike | None = None,
    run_id: str | None = None,
    shard: str | None = None,
    trust_remote_code: bool = False,
    device_caps: DeviceCaps | None = None,
    software_caps: SoftwareCaps | None = None,
    model_kwargs: dict | None = None,
    sink=None,
    verify_inputs=None,
) -> LoadedModel:
    """Load `model` with the fastest attention implementation that runs here.

    graceful: the first candidate that plans, loads and verifies; strict: the first preference
    or AttentionUnavailable (an `attn_unavailable` event is written first). Writes an
    `attn_impl` event when an events directory is given (or $ATTNFALLBACK_EVENTS is set).
    `verify_inputs`: what the verification forward feeds the model (see verify_forward).
    """
    policy = policy if policy is not None else Policy.resolve()
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

    torch_device = torch.device(dev.torch_device)
    loaded = None
    t_load = t_verify = 0.0
    for cand in the_plan.candidates:
        if not cand.viable:
            attempts.append(Attempt(cand.impl, "plan", False, list(cand.reasons)))
            continue
        t0 = time.perf_counter()
        try:
            if loaded is None:
                loaded = from_pretrained(facts, auto_class, cand.impl, dtype_name, trust_remote_code, model_kwargs or {})
                loaded.to(torch_device)
                loaded.eval()
            else:
                loaded.set_attn_implementation(cand.impl)
        except RECOVERABLE as e:
            if is_fatal_device_error(e):
                raise
            t_load += time.perf_counter() - t0
            attempts.append(Attempt(cand.impl, "load", False, [f"load failed: {_first_line(e)}"]))
            if policy.is_strict:
                raise fail() from e
            continue
        except OSError as e:
            raise ModelLoadError(f"cannot load {facts.model_id}: {_first_line(e)}") from e
        t_load += time.perf_counter() - t0
        actual = getattr(loaded.config, "_attn_implementation", None) or cand.impl
        if policy.verify:
            t0 = time.perf_counter()
            reasons = verify_forward(loaded, facts, torch_device, verify_inputs)
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
        raise fail()

    result = LoadedModel(model=loaded, decision=decision, facts=facts, device=torch_device, sink=sink)
    if policy.mode is Mode.FASTEST:
        from attnfallback.fastest import choose_fastest

        choose_fastest(result, [c.impl for c in the_plan.candidates if c.viable])
    if torch_device.type == "cuda" and policy.verify:
        from attnfallback.kernels_seen import attention_kernels

        t0 = time.perf_counter()
        decision.kernels = attention_kernels(loaded, facts, torch_device)
        decision.timing["kernels_s"] = time.perf_counter() - t0

    if decision.fell_back:
        log.warning("attention: requested %s, using %s (%s)", decision.requested, decision.used, decision.first_reason)
    elif decision.used != decision.requested:
        log.info("attention: using %s, measured fastest of %s", decision.used, ", ".join(decision.measured["tokens_per_s"]))
    else:
        log.info("attention: using %s as requested", decision.used)
    if sink is not None:
        sink.emit("attn_impl", **decision.to_dict())
    return result
