"""The fingerprint of an apply's input: the policy file's bytes and those of every set file it
names. load_policy computes it while parsing; `apply` recomputes it from the files alone, so
an unchanged input is recognised before any parsing, validation or compiling.

Not validation (netbpf/policy) and not the plan (netbpf/engine/plan.py): files and hashes only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path


def start(policy_bytes: bytes):
    return hashlib.sha256(policy_bytes)


def add_set_file(digest, name: str, data: bytes) -> None:
    """name: the file as the policy writes it (relative to the policy's directory)."""
    digest.update(b"\0set\0" + name.encode() + b"\0" + str(len(data)).encode() + b"\0")
    digest.update(data)


@dataclass
class Inputs:
    """The policy file's bytes and those of its set files (name as the policy writes it),
    read once: what an early answer (netbpf/engine/early.py) works from."""
    path: Path
    policy: bytes
    sets: dict[str, bytes] = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, repr=False)

    def digest(self) -> str:
        if "digest" not in self._memo:
            d = start(self.policy)
            for name, data in self.sets.items():
                add_set_file(d, name, data)
            self._memo["digest"] = d.hexdigest()
        return self._memo["digest"]

    def sha(self, name: str | None = None) -> str:
        """sha256 of a set file's bytes (None: the policy file's)."""
        if ("sha", name) not in self._memo:
            data = self.policy if name is None else self.sets[name]
            self._memo[("sha", name)] = hashlib.sha256(data).hexdigest()
        return self._memo[("sha", name)]


def read_inputs(policy: Path, set_files: list[str]) -> Inputs | None:
    """None if one is unreadable (the full path reports it)."""
    try:
        base = policy.resolve().parent
        return Inputs(policy, policy.read_bytes(),
                      {name: (base / name).read_bytes() for name in set_files})
    except (OSError, RuntimeError):
        return None


def input_hash(policy: Path, set_files: list[str]) -> str | None:
    """The fingerprint of policy and set_files as they are now; None if one is unreadable."""
    got = read_inputs(policy, set_files)
    return got.digest() if got else None
