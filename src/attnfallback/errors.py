"""Every error attnfallback raises, and the exit code the command line gives each.

    AttnFallbackError                 base; exit 1
    ├── UsageError                    bad usage or bad input; exit 2
    │   ├── UnknownNameError          an implementation, dtype, GPU class ... not known (.valid lists them)
    │   ├── ModelNotFoundError        a model path or id that cannot be found (.path)
    │   ├── InputError                a malformed input file (.path, .line, .expected, .found)
    │   │   └── TokenizerMismatchError  ids the model's tables cannot take: a token id >= the vocabulary,
    │   │                             a type id >= type_vocab_size, a row beyond the positions (.limit, .value)
    │   ├── ConfigError               a sweep configuration that does not hold (.path, .key)
    │   ├── RemoteCodeError           a model asking for remote code without --trust-remote-code
    │   ├── NewHeadError              the checkpoint carries no weights for (part of) the model the task
    │   │                             needs, so transformers would make them up (.missing, .task);
    │   │                             or a causal LM asked of a model that is not one
    │   ├── CheckpointError           the weights cannot be read (also a ModelLoadError)
    │   └── OutputRefused             the output is a directory, another run's, locked, not writable
    │       │                         (also an OutputError)
    │       └── OutputExistsError     the output, its partial parts or its lock is there already: another
    │                                 run's or job's; the user chooses (--resume, remove it, another output)
    ├── AttentionUnavailable          strict policy and the preferred implementation cannot run; exit 3
    │                                 (.reasons: {implementation: [reason, ...]}, .attempts)
    ├── ParityError                   an implementation's outputs are over tolerance; exit 4
    ├── ModelLoadError                loading failed for a reason no implementation explains (every
    │                                 implementation tried failed the same way); exit 1
    ├── NonFiniteError                the model produced NaN/inf (.ids); exit 1
    └── OutputError                   output cannot be written (disk full ...; .path); exit 1

    KeyboardInterrupt
    └── Interrupted                   Ctrl-C during `score`: what was committed (.output, .parts,
                                      .rows) and how to resume; exit 130 (128 + SIGINT)

Input checks raise one of these, never `assert`. `is_fatal_device_error` tells a CUDA error that
leaves the context unusable (torch's AcceleratorError after a device-side assert): the command line
then exits at once, with 1, after the shard_failed event (cli/app.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


class AttnFallbackError(Exception):
    """Base of all attnfallback errors."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # Subclasses take their context as constructor arguments; rebuild from the instance's
        # attributes instead, so errors cross process boundaries (Ray actors, pools) intact.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls, message: str, state: dict) -> AttnFallbackError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class UsageError(AttnFallbackError):
    """Bad usage or bad input: the user can fix it."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A name (implementation, dtype, GPU class, task ...) that is not one of the valid ones."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind = kind
        self.name = name
        self.valid = list(valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(self.valid)}")


class ModelNotFoundError(UsageError):
    """A model reference that is neither a usable directory nor reachable on the hub."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(message)


class InputError(UsageError):
    """A malformed input: names the file, the line, what was expected and what was found."""

    def __init__(
        self,
        message: str,
        path: str | None = None,
        line: int | None = None,
        expected: str | None = None,
        found: str | None = None,
    ):
        self.path = path
        self.line = line
        self.expected = expected
        self.found = found
        where = path if line is None else f"{path}:{line}"
        text = f"{where}: {message}" if where else message
        if expected is not None:
            text += f" (expected {expected}"
            text += f", found {found})" if found is not None else ")"
        super().__init__(text)


class TokenizerMismatchError(InputError):
    """Ids a row's tokenizer produced that the model's tables cannot take (scoring/limits.py): the
    tokenizer does not match the model. Raised on the host, before a forward would index out of range."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, limit: int | None = None,
                 value: int | None = None, what: str | None = None):
        self.limit = limit
        self.value = value
        self.what = what
        super().__init__(message, path=path, line=line)


class ConfigError(UsageError):
    """A configuration file that does not hold."""

    def __init__(self, message: str, path: str | None = None, key: str | None = None):
        self.path = path
        self.key = key
        super().__init__(f"{path}: {message}" if path else message)


class RemoteCodeError(UsageError):
    """The model's config asks for code from the hub, and the user did not allow it."""


class AttentionUnavailable(AttnFallbackError):
    """Strict policy: the preferred attention implementation cannot run here."""

    exit_code = 3

    def __init__(
        self,
        requested: str,
        reasons: Mapping[str, Sequence[str]],
        attempts: Sequence[object] = (),
        strict: bool = True,
    ):
        self.requested = requested
        self.reasons = {impl: list(rs) for impl, rs in reasons.items()}
        self.attempts = list(attempts)
        self.strict = strict
        if strict:
            lines = [f"attention implementation {requested} is unavailable (strict policy):"]
        else:
            lines = ["no preferred attention implementation can run here:"]
        for impl, rs in self.reasons.items():
            for r in rs:
                lines.append(f"  {impl}: {r}")
        super().__init__("\n".join(lines))


class ParityError(AttnFallbackError):
    """An implementation's outputs differ from the reference by more than the tolerance."""

    exit_code = 4


class ModelLoadError(AttnFallbackError):
    """Loading failed for a reason that no attention implementation explains."""


class NonFiniteError(AttnFallbackError):
    """The model produced NaN or inf for some rows."""

    def __init__(self, message: str, ids: Sequence[object] = ()):
        self.ids = list(ids)
        super().__init__(message)


# Sticky CUDA errors (the CUDA runtime's list): after one of these the context cannot be used again.
# Errors a context survives (no kernel image for this GPU, out of memory) are not among them.
FATAL_DEVICE_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "unspecified launch failure",
    "misaligned address",
    "invalid program counter",
    "hardware stack error",
    "uncorrectable ecc error",
    "the launch timed out and was terminated",
    "operation not supported on global/shared address space",
)


def is_fatal_device_error(exc: BaseException) -> bool:
    """True when `exc` says the CUDA context is lost (torch raises torch.AcceleratorError, a
    RuntimeError, with "CUDA error: device-side assert triggered" and the like)."""
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in FATAL_DEVICE_MARKERS)


class OutputError(AttnFallbackError):
    """The output location cannot be written, or another run holds it."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(message)


class NewHeadError(UsageError):
    """The checkpoint has no weights for parameters the model needs (a head, most often): loading
    would initialise them at random and every output would be made up. `--allow-new-head` (or
    `allow_new_head=True`) lets a user who means it through."""

    def __init__(self, message: str, missing: Sequence[str] = (), task: str | None = None, model_class: str | None = None):
        self.missing = list(missing)
        self.task = task
        self.model_class = model_class
        super().__init__(message)


class CheckpointError(UsageError, ModelLoadError):
    """The checkpoint's weight files are missing, unreadable or corrupt."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(message)


class OutputRefused(UsageError, OutputError):
    """The output cannot be used as given: a directory, another run's (or a foreign) file, locked
    by a running job, or in a location that cannot be written. The user can fix it: exit 2."""


class OutputExistsError(OutputRefused):
    """The output is taken: a completed or partial output of another run or job, a file
    attnfallback did not write, or a lock another run holds. Bad usage: exit 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after what was committed was made safe. Still a KeyboardInterrupt, so
    `except KeyboardInterrupt` in user code sees it; the command line exits 130."""

    exit_code = 130

    def __init__(self, message: str, output: str | None = None, parts: int = 0, rows: int = 0):
        super().__init__(message)
        self.message = message
        self.output = output
        self.parts = parts
        self.rows = rows

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.message, self.output, self.parts, self.rows))
