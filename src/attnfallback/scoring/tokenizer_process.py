"""Tokenizing in a child process, so the thread that launches the GPU work keeps the GIL.

A BERT-base forward on an H100 is thousands of small kernel launches, each a Python call that
needs the GIL. Tokenizing in a worker thread of the same process means holding the GIL too: the
fast tokenizer's output becomes Python lists, then arrays (about 0.1 s per 8k rows of GIL-held
work), and each such slice is time the launching thread waits (bench/NOTES.md, v8: every chunk
prepared ahead ran 0.73-0.85 of the GPU-only rate, tokenizing alongside 0.62). A child process has
its own interpreter and GIL: it tokenizes and sends back flat arrays, which arrive as one copy.

The child is a fresh interpreter (`python -m attnfallback.scoring.tokenizer_process FD`: no fork of
a process holding CUDA, and unlike multiprocessing's spawn it does not import the parent's main
module), started once per scorer and reused for every chunk; it gets the tokenizer with its first
request. If it cannot start or dies, the scorer tokenizes in its worker thread again and says why.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from attnfallback.scoring.tokenize import Encoded, TextEncoder

log = logging.getLogger("attnfallback")

TOKENIZER_PROCESS_MODES = ("auto", "off")
START_TIMEOUT_S = 120.0  # a child not ready by then is given up on (the worker thread tokenizes)
POLL_S = 0.5  # how often a wait for the child checks that it is still alive


def check_tokenizer_process_mode(mode: str) -> str:
    from attnfallback.errors import UsageError

    if mode not in TOKENIZER_PROCESS_MODES:
        raise UsageError(f"--tokenizer-process must be auto or off, found {mode!r}")
    return mode


def process_obstacle(encoder: TextEncoder) -> str | None:
    """Why this encoder's work cannot move to a child process, or None."""
    if os.name != "posix":
        return "a child process for tokenizing needs a POSIX system"
    if not encoder.fast:
        return "the tokenizer is not a fast one"
    if encoder.mode not in ("single", "pair"):
        return f"{encoder.mode} rows are tokenized in two calls"
    return None


def _serve(conn: Connection) -> None:
    """The child: the first message configures it (tokenizer JSON, mode, max_length, type ids); then it encodes
    each list of texts it is sent with TextEncoder, as the parent would, and replies with flat arrays
    (or the error), until None or EOF."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    encoder = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        try:
            if encoder is None:
                tokenizer_json, mode, max_length, type_ids = message
                # TextEncoder needs of a transformers tokenizer only its fast backend
                backend = SimpleNamespace(is_fast=True, backend_tokenizer=Tokenizer.from_str(tokenizer_json))
                encoder = TextEncoder(backend, max_length, mode, type_ids)
                conn.send(("ready", None))
                continue
            encoded = encoder.encode(message)
            ids, types, _ = encoded.flat()
            if len(ids) and int(ids.max()) < 2 ** 31:  # half the bytes through the socket
                ids = ids.astype(np.int32)
            conn.send(("ok", (ids, types, encoded.lengths, encoded.truncated)))
        except Exception as e:  # noqa: BLE001 - sent to the parent, raised there
            conn.send(("error", f"{type(e).__name__}: {e}"))


class ChildDied(RuntimeError):
    """The tokenizer process ended or stopped answering."""


class ProcessEncoder:
    """`encode(texts) -> Encoded` as TextEncoder's, done by a child process. One call at a time."""

    def __init__(self, encoder: TextEncoder):
        obstacle = process_obstacle(encoder)
        if obstacle is not None:
            raise ValueError(obstacle)
        self.encoder = encoder
        parent_end, child_end = socket.socketpair()
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # where `attnfallback` imports from
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "attnfallback.scoring.tokenizer_process", str(child_end.fileno())],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        finally:
            child_end.close()
        self._conn = Connection(parent_end.detach())
        self._configured = False
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def _receive(self, timeout: float | None):
        waited = 0.0
        while not self._conn.poll(POLL_S):
            waited += POLL_S
            if not self.alive:
                raise ChildDied(f"the tokenizer process ended (exit code {self._process.returncode})")
            if timeout is not None and waited >= timeout:
                raise ChildDied(f"the tokenizer process did not answer within {timeout:.0f} s")
        try:
            return self._conn.recv()
        except (EOFError, OSError) as e:
            raise ChildDied(f"the tokenizer process ended ({type(e).__name__})") from None

    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError) as e:
            raise ChildDied(f"the tokenizer process ended ({type(e).__name__}: {e})") from None

    def encode(self, texts: list[tuple[str, ...]]) -> Encoded:
        """Raises ChildDied when the child is gone; the error of a failed encode as RuntimeError."""
        with self._lock:
            if not self._configured:
                self._send((self.encoder._main.to_str(), self.encoder.mode, self.encoder.max_length, self.encoder.type_ids))
                kind, payload = self._receive(START_TIMEOUT_S)
                if kind != "ready":
                    raise ChildDied(f"the tokenizer process could not load the tokenizer: {payload}")
                self._configured = True
            self._send(texts)
            kind, payload = self._receive(None)
        if kind == "error":
            raise RuntimeError(f"tokenizing failed in the tokenizer process: {payload}")
        ids, types, lengths, truncated = payload
        return Encoded.from_flat(ids.astype(np.int64, copy=False), types, np.asarray(lengths), np.asarray(truncated))

    def close(self) -> None:
        """Ask the child to stop; end it if it does not."""
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self._process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=2)
        self._conn.close()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
