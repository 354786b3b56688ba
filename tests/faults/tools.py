"""Helpers of the fault suite: command results, directory snapshots, injection switches."""

from __future__ import annotations

import os
from pathlib import Path


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def error_line(self) -> str:
        """The first `error:` line on stderr (what a user reads)."""
        for line in self.err.splitlines():
            if line.startswith("error:"):
                return line
        return ""

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, err={self.err[-2000:]!r})"


def snapshot(root: Path) -> set[str]:
    """Every path under `root` (relative, directories with a trailing slash)."""
    root = Path(root)
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for d in dirnames:
            found.add(f"{(rel / d).as_posix()}/")
        for f in filenames:
            found.add((rel / f).as_posix())
    return found



def read_events(directory) -> list[dict]:
    """Every complete event under `directory`, file by file, in order (torn lines left out)."""
    import json

    records = []
    for path in sorted(Path(directory).rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def mount_tmpfs(path: Path, size: str, read_only: bool = False) -> str | None:
    """Mount a tmpfs of `size` at `path` (root only); None if it worked, else why not.
    $ATTNFALLBACK_FAULTS_NO_MOUNT=1 refuses, to exercise the fallbacks of a machine without root."""
    import subprocess

    if os.environ.get("ATTNFALLBACK_FAULTS_NO_MOUNT") == "1":
        return "mounting disabled by ATTNFALLBACK_FAULTS_NO_MOUNT"
    if os.geteuid() != 0:
        return "not root"
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mount failed: {e}"
    return None if done.returncode == 0 else f"mount failed: {done.stderr.strip() or done.returncode}"


def remount(path: Path, options: str) -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True, timeout=30)


def unmount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def write_jsonl(path: Path, rows) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


WORDS = ("the quick brown fox jumps over a lazy dog while attention kernels fall back on older gpus "
         "and every shard writes its parquet part before the manifest moves on").split()


def make_texts(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    """`n` texts of 1 to `max_words` words, seeded (lengths vary, so batches differ)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]
