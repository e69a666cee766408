"""Train a temperature head for ``adaptive_temperature`` with LPO, on this machine's CPU.

    python -m ttalign.benchmarks.train_temperature_head --level token \\
        --out engine/heads/smollm2-token

1. **Prompts** (never the evaluation prompts): IFEval dev rows from ``--ifeval-from``
   (the quality runs use the first 100 rows, so the default starts at row 100) and synthetic
   arithmetic questions with exact answers. Both have exact ``rules`` rewards.
2. **Sampling**, all through the vLLM engine, many requests at once: ``--samples`` replies per
   prompt. At token level the engine's adaptive-temperature processor draws a temperature at
   every step (uniform: the untrained head) and records it; at example level each reply gets
   one temperature drawn uniformly, as the engine's ordinary ``temperature``.
3. **Pairs**: best against worst reward per prompt, ties dropped (:mod:`temperature_lpo`).
4. **Features**: the frozen policy's final hidden states (Hugging Face forward pass) at the
   positions whose logits chose each temperature, for the chosen and rejected replies only.
5. **LPO**: fit the head, hold out ``--validation`` of the pairs, write the head and a manifest
   with the data, reward, seed, metrics and command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ttalign.benchmarks.evaluate import DEFAULT_DATA_DIR as EVAL_DIR
from ttalign.benchmarks.quality.agreement import split_of
from ttalign.benchmarks.temperature_lpo import PreferencePair, Sample, fit_head, preference_pair
from ttalign.engine.base import SamplingSettings
from ttalign.engine.temperature_head import (
    DEFAULT_TEMPERATURES,
    HeadManifest,
    TemperatureHead,
    load_unembedding,
    save_head,
    unembedding_fingerprint,
)


@dataclass(frozen=True)
class TrainingPrompt:
    id: str
    family: str
    text: str
    constraints: list[dict[str, Any]]


def arithmetic_prompts(count: int, seed: int) -> list[TrainingPrompt]:
    """Questions with one exact integer answer, checked by a word-bounded regex."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op, answer = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        text = f"What is {a} {op} {b}? Reply with the result."
        pattern = rf"(^|[^0-9-]){answer}([^0-9]|$)"
        prompts.append(
            TrainingPrompt(
                f"arith-{i}", "arithmetic", text, [{"type": "regex", "pattern": pattern}]
            )
        )
    return prompts


def ifeval_prompts(
    path: Path, start: int, count: int, seed: int, split: str = "all"
) -> list[TrainingPrompt]:
    """``count`` IFEval dev rows from row ``start`` on, shuffled with ``seed``; with
    ``split`` only that half of the dev prompts (:func:`quality.agreement.split_of`)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen = [row for row in rows[start:] if split == "all" or split_of(str(row["key"])) == split]
    random.Random(seed).shuffle(chosen)
    return [
        TrainingPrompt(
            f"ifeval-{row['key']}",
            "ifeval",
            row["prompt"],
            [
                {"type": "ifeval", "instruction_id": iid, "kwargs": kw}
                for iid, kw in zip(row["instruction_id_list"], row["kwargs"], strict=True)
            ],
        )
        for row in chosen[:count]
    ]


def file_prompts(path: Path) -> list[TrainingPrompt]:
    """A prompt set of your own: JSON lines with ``prompt`` and optional ``id``, ``family``
    and ``constraints`` (the ``rules`` reward's constraint objects)."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            row = json.loads(line)
            prompts.append(
                TrainingPrompt(
                    str(row.get("id", number)),
                    str(row.get("family", "file")),
                    row["prompt"],
                    list(row.get("constraints") or []),
                )
            )
    return prompts


@dataclass
class Reply:
    token_ids: list[int]
    temperatures: list[float]
    reward: float = 0.0


async def sample_prompt(
    engine: Any, rewards: Any, prompt: TrainingPrompt, args: argparse.Namespace
) -> tuple[list[int], list[Reply]]:
    conversation = [{"role": "user", "content": prompt.text}]
    prompt_ids = await engine.render_chat(conversation)
    temperatures = list(args.temperatures)

    async def one(index: int) -> Reply:
        seed = zlib.crc32(f"{prompt.id}/{index}/{args.seed}".encode())
        if args.level == "token":
            key = f"train-{uuid.uuid4().hex}"
            spec = {"mode": "sample", "temperatures": temperatures, "record": key}
            sampling = SamplingSettings(
                temperature=1.0, max_tokens=args.max_tokens, seed=seed,
                extra_args={"ttalign_temperature": spec},
            )  # fmt: skip
            generation = await engine.generate(prompt_ids, sampling)
            ids = list(generation.completions[0].token_ids)
            record = (await engine.temperature_records([key])).get(key, [])
            return Reply(ids, record[len(record) - len(ids) :] if ids else [])
        temperature = random.Random(seed).choice(temperatures)
        sampling = SamplingSettings(temperature=temperature, max_tokens=args.max_tokens, seed=seed)
        generation = await engine.generate(prompt_ids, sampling)
        return Reply(list(generation.completions[0].token_ids), [temperature])

    replies = await asyncio.gather(*(one(i) for i in range(args.samples)))
    texts = [await engine.decode(r.token_ids) for r in replies]
    reward = rewards.get(args.reward, constraints=tuple(prompt.constraints))
    for reply, score in zip(replies, await reward.score(conversation, texts), strict=True):
        reply.reward = float(score)
    return prompt_ids, list(replies)


async def sample_all(
    prompts: list[TrainingPrompt], args: argparse.Namespace
) -> list[tuple[TrainingPrompt, list[int], list[Reply]]]:
    from ttalign.engine.vllm_engine import VllmEngine

    engine = VllmEngine.start(
        args.model, model_name="policy", enforce_eager=True, kv_cache_memory=args.kv_cache_memory,
        max_model_len=2048, max_num_seqs=max(64, args.samples * args.concurrency),
    )  # fmt: skip
    from ttalign.reward_clients.config import load_reward_registry

    # The judge reward, if named, judges with the policy being trained, as on the server;
    # with --judge-model, judge-strong and auto_constraints judge on an engine of their own.
    judge_engine = start_judge_engine(args.judge_model) if args.judge_model else None
    rewards = load_reward_registry(
        args.reward_config, None, engine=engine, judge_engine=judge_engine
    )
    rewards.get(args.reward, constraints=tuple(prompts[0].constraints))  # fail fast
    limiter = asyncio.Semaphore(args.concurrency)
    done = 0
    started = time.monotonic()

    async def guarded(prompt: TrainingPrompt) -> tuple[TrainingPrompt, list[int], list[Reply]]:
        nonlocal done
        async with limiter:
            prompt_ids, replies = await sample_prompt(engine, rewards, prompt, args)
        done += 1
        if done % 10 == 0:
            print(
                f"sampled {done}/{len(prompts)} prompts in {time.monotonic() - started:.0f} s",
                file=sys.stderr,
            )
        return prompt, prompt_ids, replies

    try:
        return list(await asyncio.gather(*(guarded(p) for p in prompts)))
    finally:
        await rewards.close()
        await engine.shutdown()
        if judge_engine is not None:
            await judge_engine.shutdown()


def start_judge_engine(judge_model: str) -> Any:
    """The judge engine the server would start for ``--judge-model`` (same defaults)."""
    from ttalign.server.engine_factory import build_judge_engine
    from ttalign.server.settings import ServerSettings

    return build_judge_engine(ServerSettings(judge_model=judge_model, enforce_eager=True))


def save_samples(
    path: Path,
    sampled: list[tuple[TrainingPrompt, list[int], list[Reply]]],
    sampling_seconds: float,
) -> None:
    rows = [
        {"id": p.id, "prompt_ids": ids, "replies": [vars(r) for r in replies]}
        for p, ids, replies in sampled
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sampling_seconds": sampling_seconds, "rows": rows}))


def load_samples(
    path: Path, prompts: list[TrainingPrompt]
) -> tuple[list[tuple[TrainingPrompt, list[int], list[Reply]]], float | None]:
    """The cached replies of ``prompts``, and how long sampling them took (if recorded)."""
    data = json.loads(path.read_text())
    rows, seconds = (
        (data, None) if isinstance(data, list) else (data["rows"], data.get("sampling_seconds"))
    )
    by_id = {p.id: p for p in prompts}
    sampled = [
        (by_id[row["id"]], row["prompt_ids"], [Reply(**r) for r in row["replies"]])
        for row in rows
        if row["id"] in by_id
    ]
    return sampled, seconds


def nearest_indices(values: list[float], temperatures: tuple[float, ...]) -> torch.Tensor:
    table = torch.tensor(temperatures)
    return (torch.tensor(values)[:, None] - table[None, :]).abs().argmin(dim=1)


class HiddenStates:
    """The frozen policy's final (normalized) hidden states, from a Hugging Face forward pass."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM

        self._model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def at(self, token_ids: list[int], positions: range) -> torch.Tensor:
        output = self._model.model(input_ids=torch.tensor([token_ids]))
        return output.last_hidden_state[0, positions.start : positions.stop]


def build_samples(
    states: HiddenStates,
    prompt_ids: list[int],
    replies: list[Reply],
    level: str,
    temperatures: tuple[float, ...],
) -> list[Sample]:
    """Features only for the replies a pair can use: the best and the worst."""
    prompt_end = len(prompt_ids)
    samples = []
    for reply in replies:
        if level == "example":
            features = states.at(prompt_ids, range(prompt_end - 1, prompt_end))
            choices = nearest_indices(reply.temperatures, temperatures)
        else:
            count = min(len(reply.token_ids), len(reply.temperatures))
            if count == 0:
                continue
            sequence = prompt_ids + reply.token_ids[: count - 1]
            features = states.at(sequence, range(prompt_end - 1, prompt_end - 1 + count))
            choices = nearest_indices(reply.temperatures[:count], temperatures)
        samples.append(Sample(reply.reward, features, choices))
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--level", choices=["example", "token"], required=True)
    parser.add_argument("--out", type=Path, required=True, help="head path, without suffix")
    parser.add_argument("--model", help="policy folder (default: the embedded SmolLM2)")
    parser.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    parser.add_argument(
        "--ifeval-from", type=int, default=100, help="first IFEval dev row used (%(default)s)"
    )
    parser.add_argument("--ifeval-prompts", type=int, default=150)
    parser.add_argument(
        "--ifeval-split",
        choices=["tune", "report", "all"],
        default="all",
        help="only this half of the IFEval dev prompts (tune: never the prompts the strong "
        "judge's results are reported on)",
    )
    parser.add_argument("--arithmetic-prompts", type=int, default=50)
    parser.add_argument(
        "--prompts",
        type=Path,
        help="JSON lines of training prompts (default: IFEval dev rows from --ifeval-from "
        "plus synthetic arithmetic); never the prompts you evaluate on",
    )
    parser.add_argument(
        "--reward",
        default="rules",
        help="reward client: rules (default), judge (the policy as LLM judge), or a client "
        "defined in --reward-config (a vLLM pooling reward model, TEI, a composite, ...)",
    )
    parser.add_argument("--reward-config", type=Path, help="reward clients file, as for serve")
    parser.add_argument(
        "--judge-model",
        help="serve this judge beside the policy, as ttalign serve --judge-model does "
        "(rewards judge-strong and auto_constraints)",
    )
    parser.add_argument("--samples", type=int, default=8, help="replies per prompt (N)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(DEFAULT_TEMPERATURES))
    parser.add_argument("--concurrency", type=int, default=8, help="prompts sampled at once")
    parser.add_argument("--kv-cache-memory", type=int, default=2 * 2**30)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument(
        "--beta",
        type=float,
        help="LPO beta (default: 1 at example level, 0.02 at token level, chosen on the "
        "held-out pairs)",
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--validation", type=float, default=0.2, help="held-out fraction of pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--samples-cache",
        type=Path,
        help="JSON file of the sampled replies: read if it exists (refit without sampling), "
        "else written after sampling",
    )
    args = parser.parse_args(argv)
    if args.beta is None:
        args.beta = 1.0 if args.level == "example" else 0.02
    if args.model is None:
        from ttalign.server.model_prep import prepare_embedded_model

        args.model = str(prepare_embedded_model())
    temperatures = tuple(args.temperatures)
    if args.prompts is not None:
        prompts = file_prompts(args.prompts)
    else:
        prompts = ifeval_prompts(
            args.eval_dir / "ifeval_dev.jsonl",
            args.ifeval_from,
            args.ifeval_prompts,
            args.seed,
            args.ifeval_split,
        )
        prompts += arithmetic_prompts(args.arithmetic_prompts, args.seed)
    started = time.monotonic()
    refit = args.samples_cache is not None and args.samples_cache.is_file()
    if refit:
        sampled, sampling_seconds = load_samples(args.samples_cache, prompts)
    else:
        sampled = asyncio.run(sample_all(prompts, args))
        sampling_seconds = time.monotonic() - started
        if args.samples_cache is not None:
            save_samples(args.samples_cache, sampled, sampling_seconds)
    fitting = time.monotonic()

    states = HiddenStates(args.model)
    pairs: list[PreferencePair] = []
    ties = 0
    reward_by_temperature: dict[float, list[float]] = {t: [] for t in temperatures}
    for _prompt, prompt_ids, replies in sampled:
        if args.level == "example":
            for reply in replies:
                reward_by_temperature[reply.temperatures[0]].append(reply.reward)
        best = max(replies, key=lambda r: r.reward)
        worst = min(replies, key=lambda r: r.reward)
        if best.reward == worst.reward:
            ties += 1
            continue
        pair = preference_pair(
            build_samples(states, prompt_ids, [best, worst], args.level, temperatures)
        )
        if pair is not None:
            pairs.append(pair)
    random.Random(args.seed).shuffle(pairs)
    held_out = int(len(pairs) * args.validation)
    validation, train = pairs[:held_out], pairs[held_out:]
    hidden_size = pairs[0].chosen.features.shape[1]
    torch.manual_seed(args.seed)  # the head's initial weights, so a refit is reproducible
    head = TemperatureHead(hidden_size, args.hidden, len(temperatures))
    report = fit_head(
        head, train, validation, beta=args.beta, epochs=args.epochs,
        learning_rate=args.learning_rate, seed=args.seed,
    )  # fmt: skip
    with torch.no_grad():
        all_features = torch.cat([s.features for p in pairs for s in (p.chosen, p.rejected)])
        picks = Counter(head(all_features).argmax(-1).tolist())
    manifest = HeadManifest(
        temperatures=temperatures,
        level=args.level,
        input_dim=hidden_size,
        hidden_dim=args.hidden,
        model_fingerprint=unembedding_fingerprint(load_unembedding(args.model)),
        training={
            "command": "python -m ttalign.benchmarks.train_temperature_head "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "method": "LPO, one round, replies sampled with uniformly drawn temperatures",
            "prompts": {"file": str(args.prompts)}
            if args.prompts
            else {
                "ifeval_dev_rows": (
                    f"{args.ifeval_prompts} drawn (seed {args.seed}) from row "
                    f"{args.ifeval_from} on (split {args.ifeval_split}); the quality runs use "
                    "rows 0-99, and the strong judge's the report half"
                ),
                "arithmetic": args.arithmetic_prompts,
            },
            "reward": (
                "rules (IFEval checkers; exact-answer regex for arithmetic)"
                if args.reward == "rules"
                else args.reward
            ),
            "samples_per_prompt": args.samples,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
            "beta": args.beta,
            "epochs": args.epochs,
            "epoch_kept": report.epochs,
            "pairs": len(pairs),
            "prompts_all_tied": ties,
            "train_pairs": len(train),
            "validation_pairs": len(validation),
            "train_loss": report.train_loss,
            "validation_loss": report.validation_loss,
            "validation_pair_accuracy": report.validation_accuracy,
            "argmax_temperature_on_pair_features": {
                str(temperatures[i]): n for i, n in sorted(picks.items())
            },
            "mean_reward_by_temperature": {
                str(t): (sum(v) / len(v) if v else None) for t, v in reward_by_temperature.items()
            }
            if args.level == "example"
            else None,
            "refit_from_cached_samples": refit,
            "sampling_seconds": None if sampling_seconds is None else round(sampling_seconds, 1),
            # Sampling (as first measured, for a refit) plus features and fitting.
            "total_seconds": round((sampling_seconds or 0.0) + time.monotonic() - fitting, 1),
        },
    )
    path = save_head(head, manifest, args.out)
    print(json.dumps({"head": str(path), **manifest.to_json()["training"]}, indent=2))


if __name__ == "__main__":
    main()
