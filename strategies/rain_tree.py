"""RAIN's search tree and its arithmetic, free of engines and evaluators.

The tree's root is the committed prefix. Each node holds one segment of token ids, a
prior, visit counts and a mean value in ``[-1, 1]``. The functions here are the
algorithm's rules, as the reference implementation (SafeAILab/RAIN) applies them:

- selection by ``q̂ + c·p·√N_parent / (1 + n)``, with ``q̂`` the value min-max normalized
  over the values seen (0 for an unvisited node);
- backup of a value to the root as running means, where every sibling whose embedding is
  close to the evaluated path's also receives a fraction of a visit with that value;
- dynamic widening when a node's children look alike and none of them is any good;
- the commit rule, and the smoothing of a new root's priors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Segment = tuple[int, ...]


@dataclass(eq=False)
class Node:
    """One segment of a partial reply, and what the search knows about it."""

    segment: Segment
    prior: float
    parent: Node | None = None
    #: The segment's text as the engine decoded it (for people: traces, boundary checks).
    text: str = ""
    #: Absolute depth: segments committed before the root plus depth below it.
    depth: int = 0
    #: The segment ended the reply (end-of-sequence), so nothing can follow it.
    terminal: bool = False
    #: The segment's probability under the policy, before normalization over siblings.
    probability: float = 0.0
    children: list[Node] = field(default_factory=list)
    #: Visits, including the fractional visits similar siblings pass on.
    visits: float = 0.0
    #: Evaluations that went through this node.
    real_visits: int = 0
    value: float = 0.0
    #: Running mean (over real visits) of the embeddings of the texts evaluated below it.
    embedding: np.ndarray | None = None
    #: Pending selections of a parallel round (virtual loss), undone at backup.
    virtual: int = 0
    #: Alternatives not yet made children, kept for widening: (segment, probability, text).
    reserve: list[tuple[Segment, float, str]] = field(default_factory=list)
    #: Whether the node's children have been generated (or are being generated).
    expanded: bool = False
    #: Expansions that produced no segment at all (the node is retried, a few times).
    failed_expansions: int = 0
    #: ``real_visits`` at the last widening attempt (one attempt per visit).
    widened_at: int = -1

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def path(self) -> list[Node]:
        """The nodes from just below the root down to this one."""
        nodes: list[Node] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def tokens(self) -> list[int]:
        """The token ids from just below the root to the end of this node."""
        return [token for node in self.path() for token in node.segment]

    def add_child(
        self, segment: Segment, prior: float, *, text: str = "", terminal: bool = False,
        probability: float = 0.0,
    ) -> Node:  # fmt: skip
        child = Node(
            segment, prior, self, text=text, depth=self.depth + 1, terminal=terminal,
            probability=probability,
        )  # fmt: skip
        self.children.append(child)
        return child


@dataclass(frozen=True)
class TreeSettings:
    """The numbers of RAIN's tree rules (defaults: the reference implementation's)."""

    exploration: float = 2.0
    similarity_threshold: float = 0.95
    similarity_weight: float = 0.2
    #: Widen when the children's embedding variance (L2 norm of the per-dimension
    #: variance) is below this times the children's segment length ...
    widen_variance_per_token: float = 0.03
    #: ... and the best child's value is below this.
    widen_value: float = 0.0
    max_children: int = 20
    commit_visits: int = 6
    commit_value: float = 0.8
    #: A new root's priors become ``(1 - s)·p + s/k``.
    prior_smoothing: float = 0.25
    #: The value a pending selection counts as (virtual loss), so parallel selections spread.
    virtual_value: float = -1.0


@dataclass
class ValueRange:
    """The values seen so far, for the min-max normalization of ``q`` in selection.

    It starts at ``[-1, 1]``, the evaluators' range, as in the reference.
    """

    low: float = -1.0
    high: float = 1.0

    def see(self, value: float) -> None:
        self.low = min(self.low, value)
        self.high = max(self.high, value)

    def normalize(self, value: float) -> float:
        return (value - self.low) / (self.high - self.low + 1e-5)


def selection_score(
    child: Node, parent_visits: float, values: ValueRange, settings: TreeSettings
) -> float:
    """``q̂ + c·p·√N_parent / (1 + n)`` with pending (virtual) visits counted as losses."""
    visits = child.visits + child.virtual
    if visits == 0:
        normalized = 0.0
    else:
        value = (child.value * child.visits + settings.virtual_value * child.virtual) / visits
        normalized = values.normalize(value)
    exploration = settings.exploration * child.prior * math.sqrt(parent_visits) / (1 + visits)
    return normalized + exploration


def select_child(node: Node, values: ValueRange, settings: TreeSettings) -> Node:
    """The child to descend into (the first of equal scores, as ``max`` picks)."""
    parent_visits = node.visits + node.virtual
    return max(node.children, key=lambda c: selection_score(c, parent_visits, values, settings))


def select_leaf(root: Node, values: ValueRange, settings: TreeSettings) -> Node:
    """Walk down from ``root`` to a node without children."""
    node = root
    while node.children:
        node = select_child(node, values, settings)
    return node


def add_virtual_loss(leaf: Node) -> None:
    node: Node | None = leaf
    while node is not None:
        node.virtual += 1
        node = node.parent


def remove_virtual_loss(leaf: Node) -> None:
    node: Node | None = leaf
    while node is not None:
        node.virtual -= 1
        node = node.parent


def backup(
    leaf: Node,
    value: float,
    embeddings: Sequence[np.ndarray | None],
    values: ValueRange,
    settings: TreeSettings,
) -> None:
    """Add one evaluation of ``leaf`` to every node from it up to the root.

    ``embeddings[i]`` embeds the text from ``leaf.path()[i]``'s segment to the end of the
    evaluated text (``None`` when no embedder is configured). Each node on the path
    updates its running-mean embedding, and each of its siblings whose embedding has
    cosine ``≥ similarity_threshold`` with it gets ``similarity_weight·cos`` of a visit
    with this value. Values are running means over visits, fractional ones included.
    """
    path = leaf.path()
    for node, embedding in zip(path, embeddings, strict=True):
        node.visits += 1
        node.real_visits += 1
        if embedding is not None:
            node.embedding = (
                np.asarray(embedding, dtype=np.float32)
                if node.embedding is None
                else node.embedding + (embedding - node.embedding) / node.real_visits
            )
            _share_with_similar_siblings(node, value, settings)
        node.value += (value - node.value) / node.visits
        values.see(node.value)
    root = path[0].parent if path else leaf
    assert root is not None
    root.visits += 1
    root.real_visits += 1


def _share_with_similar_siblings(node: Node, value: float, settings: TreeSettings) -> None:
    assert node.parent is not None and node.embedding is not None
    for sibling in node.parent.children:
        if sibling is node or sibling.embedding is None:
            continue
        similarity = cosine(node.embedding, sibling.embedding)
        if similarity >= settings.similarity_threshold:
            weight = settings.similarity_weight * similarity
            before = sibling.visits
            sibling.visits += weight
            sibling.value = (sibling.value * before + weight * value) / sibling.visits


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b)) / norm if norm > 0 else 0.0


def needs_widening(node: Node, settings: TreeSettings) -> bool:
    """Children that all look alike (low embedding variance), none of them good enough."""
    children = node.children
    if len(children) < 2 or len(children) >= settings.max_children:
        return False
    if any(child.embedding is None for child in children):
        return False
    spread = float(
        np.linalg.norm(np.var(np.stack([c.embedding for c in children]), axis=0, ddof=1))
    )
    threshold = settings.widen_variance_per_token * max(len(children[0].segment), 1)
    return spread < threshold and max(c.value for c in children) < settings.widen_value


def normalized(probabilities: Sequence[float]) -> list[float]:
    total = math.fsum(probabilities)
    if total <= 0:
        return [1.0 / len(probabilities)] * len(probabilities)
    return [p / total for p in probabilities]


def smooth_priors(node: Node, settings: TreeSettings) -> None:
    """Mix a root's children's priors with uniform, so the search keeps exploring there."""
    if not node.children:
        return
    k = len(node.children)
    s = settings.prior_smoothing
    mixed = normalized([(1 - s) * c.prior + s / k for c in node.children])
    for child, prior in zip(node.children, mixed, strict=True):
        child.prior = prior


def clamp_greedy_probability(greedy: float, sampled: Sequence[float]) -> float:
    """The greedy segment's probability, bounded by the sampled ones' (as the reference does).

    A greedy segment is often far likelier than any sample; capping it at the samples'
    total and flooring it at their max plus min keeps its prior from swamping theirs.
    """
    if not sampled:
        return greedy
    return max(min(greedy, math.fsum(sampled)), max(sampled) + min(sampled))


def best_child(node: Node) -> Node:
    """The most visited child, ties going to the higher value."""
    return max(node.children, key=lambda c: (c.visits, c.value))


def ready_to_commit(node: Node, settings: TreeSettings) -> bool:
    """The early commit: the best child has enough real visits and a high enough value."""
    if not node.children:
        return False
    child = best_child(node)
    return child.real_visits >= settings.commit_visits and child.value >= settings.commit_value


def promote(child: Node, settings: TreeSettings) -> Node:
    """Make ``child`` the new root, keeping its subtree, and smooth its children's priors."""
    child.parent = None
    smooth_priors(child, settings)
    return child


def best_continuation(root: Node) -> list[Node]:
    """The most visited path below ``root``, through visited nodes only."""
    path: list[Node] = []
    node = root
    while node.children:
        child = best_child(node)
        if child.real_visits == 0:
            break
        path.append(child)
        node = child
    return path


def segment_length(depth: int, lengths: Sequence[int]) -> int:
    """The length of the segments that expand a node at absolute ``depth``."""
    return lengths[min(depth, len(lengths) - 1)]
