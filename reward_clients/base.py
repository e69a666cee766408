"""The reward interface: score candidate responses to a conversation.

Every reward client, whatever its backend, implements :class:`RewardClient`. The
conversation holds the messages before the response; each candidate is scored as the
assistant's reply to it. A candidate may be a partial response (strategies that steer
mid-generation score prefixes), which is scored as a partial assistant turn.

Error tree::

    RewardClientError            the reward backend failed for this request
    ├── RewardTimeout            it did not answer within the configured timeout
    └── RewardUnavailable        it refused connections or answered with an error status
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

Message = dict[str, str]


class RewardClientError(Exception):
    """A reward backend could not score; ``client`` names the configured client."""

    status_code = 502

    def __init__(self, client: str, message: str) -> None:
        super().__init__(f"reward client {client!r}: {message}")
        self.client = client


class RewardTimeout(RewardClientError):
    status_code = 503


class RewardUnavailable(RewardClientError):
    status_code = 503


@runtime_checkable
class RewardClient(Protocol):
    """Scores candidates; one float per candidate, higher is better."""

    name: str

    async def score(
        self, conversation: Sequence[Message], candidates: Sequence[str], *, partial: bool = False
    ) -> list[float]:
        """Score every candidate as the assistant's reply to ``conversation``, in one batch.

        With ``partial`` the candidates are unfinished replies (prefixes that strategies
        steering mid-generation score): they are rendered as an open assistant turn.
        """
        ...

    async def close(self) -> None:
        """Release connections, models and background tasks."""
        ...
