"""The policy language: YAML file -> Pydantic models -> checks -> normalised IR (netbpf/policy/ir.py).

Public API: load_policy() (with positions in every error), policy_to_ir(), Policy (the root
model) and policy_schema(). Pure Python, no root; nothing here touches the kernel.
"""
from __future__ import annotations

from typing import Any

from netbpf.policy.convert import policy_to_ir
from netbpf.policy.load import LoadedPolicy, load_policy
from netbpf.policy.models import Policy


def policy_schema() -> dict[str, Any]:
    """JSON Schema of the YAML input form (for editors: yaml-language-server and friends)."""
    return Policy.model_json_schema(mode="validation")


__all__ = ["LoadedPolicy", "Policy", "load_policy", "policy_schema", "policy_to_ir"]
