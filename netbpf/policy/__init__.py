"""The policy language: YAML file -> Pydantic models -> checks -> normalised IR (netbpf/policy/ir.py).

Public API: load_policy() (with positions in every error), policy_to_ir(), Policy (the root
model) and policy_schema(). Pure Python, no root; nothing here touches the kernel.

The names load on first use: importing a light submodule (ir, inputs, vocab, addr) must not
import Pydantic and every model, which costs most of a second and would be paid by every
command, also `apply` of an unchanged policy that never parses anything.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"policy_to_ir": "netbpf.policy.convert", "LoadedPolicy": "netbpf.policy.load",
         "load_policy": "netbpf.policy.load", "Policy": "netbpf.policy.models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'netbpf.policy' has no attribute {name!r}")


def policy_schema() -> dict[str, Any]:
    """JSON Schema of the YAML input form (for editors: yaml-language-server and friends)."""
    from netbpf.policy.models import Policy
    return Policy.model_json_schema(mode="validation")


__all__ = ["LoadedPolicy", "Policy", "load_policy", "policy_schema", "policy_to_ir"]
