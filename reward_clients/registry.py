"""The reward clients a server was configured with, looked up by name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Protocol, runtime_checkable

from pydantic import AfterValidator
from ttalign.engine.replicas import ReplicaPool
from ttalign.reward_clients.base import RewardClient


def _reward_name(reward: str | None) -> str | None:
    # Reward clients are defined only in server configuration; anything URL-like is
    # refused so that no request can point the server at an address.
    if reward is not None and any(mark in reward for mark in ("://", "/", ":")):
        raise ValueError(
            "reward must be the name of a reward client configured on the server, "
            "not a URL or address"
        )
    return reward


#: The name of a configured reward client, as a request may give it (never an address).
RewardName = Annotated[str | None, AfterValidator(_reward_name)]


@runtime_checkable
class ConstraintAware(Protocol):
    """A client that scores against each request's constraints (rule verifiers)."""

    def bind(self, constraints: Sequence[dict[str, Any]]) -> RewardClient:
        """A client bound to ``constraints``; raises ``InvalidConstraintsError`` if unusable."""
        ...


class UnknownRewardError(LookupError):
    """A request named a reward client the server does not have."""

    def __init__(self, name: str | None, valid: list[str]) -> None:
        if name is None:
            message = "this strategy needs a reward client, but the server has no default; "
        else:
            message = f"unknown reward client {name!r}; "
        message += f"configured reward clients: {', '.join(valid) or '(none)'}"
        super().__init__(message)
        self.name = name
        self.valid = valid


class RewardRegistry:
    """Named reward clients plus the default one. Built once from server configuration."""

    def __init__(self, clients: Mapping[str, RewardClient], default: str | None = None) -> None:
        if default is not None and default not in clients:
            raise ValueError(f"default reward {default!r} is not among {sorted(clients)}")
        self._clients = dict(clients)
        self.default = default if default is not None else (next(iter(clients), None))

    def names(self) -> list[str]:
        return sorted(self._clients)

    def get(
        self, name: str | None = None, *, constraints: tuple[dict[str, Any], ...] = ()
    ) -> RewardClient:
        """The client called ``name`` (the default for ``None``); raises UnknownRewardError.

        ``constraints`` are the request's own verifiable constraints, for clients that
        score against them (rule verifiers); other clients ignore them.
        """
        key = name if name is not None else self.default
        if key is None or key not in self._clients:
            raise UnknownRewardError(name, self.names())
        client = self._clients[key]
        if isinstance(client, ConstraintAware):
            return client.bind(constraints)
        return client

    def replica_pools(self) -> list[ReplicaPool]:
        """The replica pool of every client that balances over replicas (its ``pool``).

        In client-name order, each pool once; for per-replica health and metrics.
        """
        pools: dict[int, ReplicaPool] = {}
        for name in self.names():
            pool = getattr(self._clients[name], "pool", None)
            if isinstance(pool, ReplicaPool):
                pools.setdefault(id(pool), pool)
        return list(pools.values())

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
