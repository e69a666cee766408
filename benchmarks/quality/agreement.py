"""How often a reward agrees with IFEval's checkers about which of two replies is better.

The replies come from the harness's own result files: several runs over the same IFEval
prompts, each reply already checked instruction by instruction (``scores.strict``). Two
replies to the same prompt form a *pair* when the checkers tell them apart: one follows
more of the prompt's instructions than the other. A reward agrees on a pair when it scores
the better reply higher; a tie counts as half, as a coin flip would. Agreement is the share
over all pairs, with a 95 % bootstrap interval that resamples *prompts* (a prompt's pairs
share its replies, so they are not independent).

The dev prompts are split in two by a salted hash of their id: prompts and examples for a
judge are tuned on ``tune`` and its figures are reported on ``report`` only.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ttalign.benchmarks.quality.intervals import bootstrap_ratio

Split = Literal["tune", "report", "all"]
SPLIT_SALT = "ttalign-judge-split-v1"


def split_of(prompt_id: str) -> Literal["tune", "report"]:
    """The half of the dev prompts that ``prompt_id`` belongs to (stable across runs)."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{prompt_id}".encode()).digest()
    return "tune" if digest[0] % 2 == 0 else "report"


@dataclass(frozen=True)
class CheckedReply:
    """One reply to a prompt, with the share of the prompt's instructions it follows."""

    run: str
    text: str
    followed: float


@dataclass(frozen=True)
class PromptReplies:
    """Every distinct checked reply to one prompt."""

    prompt_id: str
    prompt: str
    replies: tuple[CheckedReply, ...]

    def pairs(self) -> list[tuple[int, int]]:
        """``(better, worse)`` positions of every pair the checkers tell apart."""
        pairs = []
        for a, b in itertools.combinations(range(len(self.replies)), 2):
            followed_a, followed_b = self.replies[a].followed, self.replies[b].followed
            if followed_a != followed_b:
                pairs.append((a, b) if followed_a > followed_b else (b, a))
        return pairs


def collect_replies(
    documents: Iterable[Mapping[str, Any]],
    split: Split = "all",
    runs: Sequence[str] | None = None,
) -> list[PromptReplies]:
    """The checked replies of the runs in the IFEval result ``documents`` (those labelled
    in ``runs``, or all), by prompt.

    Replies that failed, or whose text repeats another reply to the same prompt, are
    dropped (a duplicate could only tie with itself). Prompts are in id order.
    """
    prompts: dict[str, str] = {}
    replies: dict[str, dict[str, CheckedReply]] = {}
    for document in documents:
        if document.get("suite") != "ifeval":
            raise ValueError(f"not an IFEval result file (suite {document.get('suite')!r})")
        for run in document["runs"]:
            if runs is not None and run["label"] not in runs:
                continue
            for output in run["outputs"]:
                strict = (output.get("scores") or {}).get("strict")
                if output.get("error") or not strict:
                    continue
                prompt_id = str(output["id"])
                if split != "all" and split_of(prompt_id) != split:
                    continue
                prompts[prompt_id] = output["prompt"]
                reply = CheckedReply(run["label"], output["output"], sum(strict) / len(strict))
                replies.setdefault(prompt_id, {}).setdefault(reply.text, reply)
    return [
        PromptReplies(key, prompts[key], tuple(replies[key].values()))
        for key in sorted(replies, key=_id_order)
    ]


def _id_order(prompt_id: str) -> tuple[int, str]:
    return (int(prompt_id), "") if prompt_id.isdigit() else (0, prompt_id)


def pair_agreement(scores: Sequence[float], pairs: Sequence[tuple[int, int]]) -> float:
    """Agreements summed over ``pairs``: 1 when the better reply scores higher, 0.5 a tie."""
    total = 0.0
    for better, worse in pairs:
        if scores[better] > scores[worse]:
            total += 1.0
        elif scores[better] == scores[worse]:
            total += 0.5
    return total


def agreement_report(
    prompts: Sequence[PromptReplies], scores: Mapping[str, Sequence[float]]
) -> dict[str, Any]:
    """Agreement of one reward over ``prompts``, given its ``scores`` by prompt id (one per
    reply, in order). Prompts without a pair count for nothing."""
    agreed: list[float] = []
    counts: list[int] = []
    ties = 0
    for prompt in prompts:
        pairs = prompt.pairs()
        if not pairs:
            continue
        values = scores[prompt.prompt_id]
        agreed.append(pair_agreement(values, pairs))
        counts.append(len(pairs))
        ties += sum(values[better] == values[worse] for better, worse in pairs)
    total = sum(counts)
    interval = bootstrap_ratio(agreed, counts)
    return {
        "prompts_with_pairs": len(counts),
        "pairs": total,
        "agreement": sum(agreed) / total if total else None,
        "interval": list(interval) if interval else None,
        "ties": ties,
    }
