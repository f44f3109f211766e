"""The routing policy a router's settings name (router/routing/policy.py lists them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from core.config import RouterConfig
from router.routing.cache_aware import CacheAware
from router.routing.cost_model import CostProfile, resolve_profile
from router.routing.kv_aware import KvAware
from router.routing.policy import RoutingPolicy
from router.routing.prefix_index import PrefixIndex
from router.routing.simple import LeastLoad, PowerOfTwo, RoundRobin

PolicyName = Literal["kv_aware", "cache_aware", "power_of_two", "least_load", "round_robin"]


def make_policy(settings: RouterConfig | PolicyName, index: PrefixIndex | None = None, *,
                profile: CostProfile | None = None,
                clock: Callable[[], float] = time.monotonic) -> RoutingPolicy:
    """The policy ``settings.policy`` names, with its settings. ``index`` is the prefix index
    the worker streams feed (kv_aware); ``profile`` defaults to ``settings.cost_profile``;
    ``clock`` (monotonic seconds) is a simulator's clock in simulations. A bare policy name
    takes every setting's default."""
    if isinstance(settings, str):
        settings = RouterConfig(policy=settings)
    name = settings.policy
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "power_of_two":
        return PowerOfTwo()
    if name == "cache_aware":
        return CacheAware(settings, clock=clock)
    if name == "kv_aware":
        return KvAware(index if index is not None else PrefixIndex(),
                       profile or resolve_profile(settings.cost_profile), settings, clock=clock)
    raise ValueError(f"unknown routing policy {name!r}")
