"""Routing policies by name."""

from __future__ import annotations

from shepherd.config import GatewayConfig
from shepherd.routing.policies.base import Policy
from shepherd.routing.policies.cache_aware import CacheAwarePolicy
from shepherd.routing.policies.power_of_two import PowerOfTwoPolicy
from shepherd.routing.policies.random import RandomPolicy
from shepherd.routing.policies.round_robin import RoundRobinPolicy


def create_policy(name: str, config: GatewayConfig) -> Policy:
    if name == "random":
        return RandomPolicy()
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy(config.cache_aware)
    raise ValueError(f"unknown policy {name!r}")


__all__ = ["Policy", "create_policy"]
