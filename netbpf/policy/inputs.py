"""The fingerprint of an apply's input: the policy file's bytes and those of every set file it
names. load_policy computes it while parsing; `apply` recomputes it from the files alone, so
an unchanged input is recognised before any parsing, validation or compiling.

Not validation (netbpf/policy) and not the plan (netbpf/engine/plan.py): files and hashes only.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def start(policy_bytes: bytes):
    return hashlib.sha256(policy_bytes)


def add_set_file(digest, name: str, data: bytes) -> None:
    """name: the file as the policy writes it (relative to the policy's directory)."""
    digest.update(b"\0set\0" + name.encode() + b"\0" + str(len(data)).encode() + b"\0")
    digest.update(data)


def input_hash(policy: Path, set_files: list[str]) -> str | None:
    """The fingerprint of policy and set_files as they are now; None if one is unreadable."""
    try:
        digest = start(policy.read_bytes())
        base = policy.resolve().parent
        for name in set_files:
            add_set_file(digest, name, (base / name).read_bytes())
    except (OSError, RuntimeError):
        return None
    return digest.hexdigest()
