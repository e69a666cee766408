"""Adaptive temperature without a real engine: LPO math, the temperature head and its folding
onto logits, the vLLM logits processor driven by hand-built batch updates, and the strategy
over the scripted fake engine."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

# The head is a torch module and the logits processor a vLLM class.
pytest.importorskip("torch", reason="needs torch")
pytest.importorskip("vllm", reason="needs vLLM")

import torch
from torch import nn
from ttalign.benchmarks.temperature_lpo import (
    PreferencePair,
    Sample,
    fit_head,
    lpo_loss,
    preference_pair,
    sequence_log_prob,
)
from ttalign.engine.base import (
    AdaptiveTemperatureEngine,
    SamplingSettings,
    StructuredOutput,
    TemperatureHeadInfo,
)
from ttalign.engine.metering import MeteredEngine
from ttalign.engine.temperature_head import (
    HeadFileError,
    HeadManifest,
    LogitsTemperatureHead,
    TemperatureHead,
    available_heads,
    entropy_temperature,
    load_head,
    nearest_index,
    normalized_entropy,
    read_manifest,
    save_head,
    temperature_table,
    unembedding_fingerprint,
)
from ttalign.engine.vllm_adaptive_temperature import (
    EXTRA_ARGS_KEY,
    HEADS_CONFIG_KEY,
    AdaptiveTemperatureProcessor,
    RowSpec,
    conflicting_settings,
)
from ttalign.server.app import create_app
from ttalign.strategies.adaptive_temperature import (
    DEFAULT_TEMPERATURES,
    AdaptiveTemperature,
    AdaptiveTemperatureConfig,
    AdaptiveTemperatureUnavailable,
)
from ttalign.strategies.base import (
    AlignmentRequest,
    DeltaEvent,
    ResultEvent,
    RewardResolver,
    StrategyContext,
)
from ttalign.strategies.errors import InvalidStrategyRequest
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from tests.conftest import fake_settings
from tests.fakes import (
    TEMPERATURE_KEY,
    AdaptiveFakeEngine,
    FakeEngine,
    FakeReward,
    temperature_spec,
)
from tests.servers import serve_in_thread

# --- LPO ---------------------------------------------------------------------------------------


def test_lpo_loss_is_minus_log_sigmoid_of_the_scaled_margin() -> None:
    # Equal log-probabilities: -log σ(0) = log 2.
    assert float(lpo_loss(torch.tensor([-2.0]), torch.tensor([-2.0]), beta=1.0)) == pytest.approx(
        math.log(2)
    )
    # β (logP_c - logP_r) = 0.5 * (-1 - -3) = 1: -log σ(1) = log(1 + e^-1).
    assert float(lpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), beta=0.5)) == pytest.approx(
        math.log1p(math.exp(-1.0))
    )
    # The rejected one more likely: margin -2 with β 1, -log σ(-2) = log(1 + e^2).
    assert float(lpo_loss(torch.tensor([-3.0]), torch.tensor([-1.0]), beta=1.0)) == pytest.approx(
        math.log1p(math.exp(2.0))
    )
    # Several pairs: the mean.
    both = lpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0]), beta=0.5)
    assert float(both) == pytest.approx(
        (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    )


def sample(reward: float) -> Sample:
    return Sample(reward, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))


def test_preference_pair_is_best_against_worst() -> None:
    samples = [sample(1.0), sample(3.0), sample(0.0), sample(2.0)]
    pair = preference_pair(samples)
    assert pair is not None
    assert pair.chosen is samples[1] and pair.rejected is samples[2]


def test_preference_pair_breaks_ties_by_position_and_drops_all_equal() -> None:
    samples = [sample(0.0), sample(2.0), sample(2.0), sample(0.0)]
    pair = preference_pair(samples)
    assert pair is not None
    assert pair.chosen is samples[1] and pair.rejected is samples[0]
    assert preference_pair([sample(1.0), sample(1.0), sample(1.0)]) is None
    assert preference_pair([sample(1.0)]) is None


def test_sequence_log_prob_sums_the_chosen_log_probabilities() -> None:
    probabilities = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    features = probabilities.log()  # nn.Identity: the features are the head's scores
    chosen = Sample(1.0, features, torch.tensor([0, 2, 2]))
    expected = math.log(0.5) + math.log(0.3) + math.log(0.6)
    assert float(sequence_log_prob(nn.Identity(), chosen)) == pytest.approx(expected, rel=1e-6)


@pytest.fixture
def one_thread():
    """Tiny tensors: torch's thread pool only adds contention (the machine has two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_fit_head_learns_a_separable_preference() -> None:
    """Feature 0 positive: the cold temperature (0) wins; negative: the hot one (1)."""
    generator = torch.Generator().manual_seed(3)

    def pair() -> PreferencePair:
        features = torch.randn(4, 3, generator=generator)
        good = (features[:, 0] < 0).long()
        return PreferencePair(Sample(1.0, features, good), Sample(0.0, features, 1 - good))

    train = [pair() for _ in range(64)]
    validation = [pair() for _ in range(32)]
    torch.manual_seed(0)
    head = TemperatureHead(3, 8, 2)
    report = fit_head(head, train, validation, beta=1.0, epochs=10, learning_rate=1e-2, seed=0)
    assert 1 <= report.epochs <= 10
    assert report.validation_accuracy is not None and report.validation_accuracy > 0.9
    assert report.train_loss < math.log(2) / 2
    assert report.validation_loss is not None and report.validation_loss < math.log(2)


# --- the temperature head ----------------------------------------------------------------------

VOCAB, HIDDEN, HEAD_HIDDEN = 48, 12, 16
HEAD_TEMPERATURES = (0.0, 0.4, 0.8, 1.2)


def random_head(seed: int = 0) -> TemperatureHead:
    torch.manual_seed(seed)
    head = TemperatureHead(HIDDEN, HEAD_HIDDEN, len(HEAD_TEMPERATURES))
    with torch.no_grad():
        head.feature_mean.copy_(torch.randn(HIDDEN))
        head.feature_scale.copy_(torch.rand(HIDDEN) + 0.5)
        # A trained head's last layer is not zero (an untrained one's is): randomize it.
        head.layers[-1].weight.normal_(0.0, 0.3)
        head.layers[-1].bias.normal_(0.0, 0.3)
        for layer in head.layers:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(3.0)  # spread the scores so argmaxes are clear-cut
    return head.eval()


def unembedding(seed: int = 1) -> torch.Tensor:
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_an_untrained_head_is_uniform_over_the_set() -> None:
    head = TemperatureHead(HIDDEN, HEAD_HIDDEN, len(HEAD_TEMPERATURES))
    with torch.no_grad():
        probabilities = head.log_probs(torch.randn(4, HIDDEN)).exp()
    torch.testing.assert_close(
        probabilities, torch.full_like(probabilities, 1 / len(HEAD_TEMPERATURES))
    )


def test_folded_head_computes_the_heads_scores_from_logits() -> None:
    head, matrix = random_head(), unembedding()
    hidden = torch.randn(10, HIDDEN, generator=torch.Generator().manual_seed(2))
    folded = LogitsTemperatureHead(head, matrix)
    with torch.no_grad():
        direct = head(hidden)
    from_logits = folded.scores(hidden @ matrix.T)
    torch.testing.assert_close(from_logits, direct, atol=1e-4, rtol=1e-4)
    assert len(set(direct.argmax(-1).tolist())) >= 2  # the rows do not all agree


def test_head_files_round_trip_and_refuse_other_models(tmp_path: Path) -> None:
    head, matrix = random_head(), unembedding()
    manifest = HeadManifest(
        HEAD_TEMPERATURES, "token", HIDDEN, HEAD_HIDDEN, unembedding_fingerprint(matrix)
    )
    save_head(head, manifest, tmp_path / "heads" / "h")
    loaded, read = load_head(tmp_path / "heads" / "h.safetensors")
    assert read == manifest
    hidden = torch.randn(3, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(loaded(hidden), head(hidden))
    with pytest.raises(HeadFileError, match="does not exist"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "bad.json").write_text('{"level": "sentence"}')
    with pytest.raises(HeadFileError, match="level"):
        read_manifest(tmp_path / "bad")

    model = model_folder(tmp_path / "model", matrix)
    other = model_folder(tmp_path / "other", unembedding(seed=9))
    assert available_heads({"h": tmp_path / "heads" / "h"}, model) == ({"h": manifest}, {})
    usable, refused = available_heads({"h": tmp_path / "heads" / "h"}, other)
    assert usable == {} and "another model" in refused["h"]


def test_entropy_rule_and_snapping() -> None:
    uniform = torch.zeros(1, 8)
    certain = torch.tensor([[50.0] + [0.0] * 7])
    entropy = normalized_entropy(torch.cat([uniform, certain]))
    assert entropy[0] == pytest.approx(1.0) and entropy[1] == pytest.approx(0.0, abs=1e-6)
    chosen = entropy_temperature(
        torch.cat([uniform, certain]),
        torch.tensor([0.2, 0.2]),
        torch.tensor([1.0, 1.0]),
        torch.tensor([1.0, 1.0]),
    )
    torch.testing.assert_close(chosen, torch.tensor([1.0, 0.2]))
    table = temperature_table([[0.0, 0.5, 1.0], [0.3]])
    assert table[1].tolist() == [pytest.approx(0.3), math.inf, math.inf]
    assert nearest_index(torch.tensor([0.7, 2.0]), table).tolist() == [1, 0]


# --- the logits processor ----------------------------------------------------------------------

MAX_ROWS = 6


def model_folder(folder: Path, matrix: torch.Tensor) -> Path:
    """A tiny Hugging Face-shaped model folder holding only the (tied) embeddings."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"model.embed_tokens.weight": matrix.contiguous()}, str(folder / "model.safetensors"))
    return folder


def processor(
    heads: dict[str, str] | None = None, model: Path | None = None
) -> AdaptiveTemperatureProcessor:
    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=MAX_ROWS),
        model_config=SimpleNamespace(max_model_len=32, model=str(model or "unused")),
        additional_config={HEADS_CONFIG_KEY: heads} if heads else {},
    )
    return AdaptiveTemperatureProcessor(config, torch.device("cpu"), False)


def opted(**spec: object) -> SamplingParams:
    return SamplingParams(extra_args={EXTRA_ARGS_KEY: spec})


def entropy(*temperatures: float, **more: object) -> SamplingParams:
    return opted(mode="entropy", temperatures=list(temperatures), **more)


def update(
    proc: AdaptiveTemperatureProcessor,
    size: int,
    added: dict[int, SamplingParams] | None = None,
    removed: tuple[int, ...] = (),
    moved: tuple[tuple[int, int, MoveDirectionality], ...] = (),
    output: list[int] | None = None,
) -> None:
    rows = [(i, params, [1, 2], list(output or [])) for i, params in (added or {}).items()]
    proc.update_state(BatchUpdate(size, list(removed), rows, list(moved)))


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 10, generator=torch.Generator().manual_seed(seed))


def applied(proc: AdaptiveTemperatureProcessor, batch: torch.Tensor) -> torch.Tensor:
    return proc.apply(batch.clone())


def test_each_opted_row_is_divided_by_its_temperature_and_others_are_untouched() -> None:
    proc = processor()
    update(proc, 4, {0: entropy(0.5), 1: SamplingParams(), 2: entropy(0.25), 3: SamplingParams()})
    batch = logits(4)
    out = applied(proc, batch)
    assert torch.equal(out[0], batch[0] / 0.5)
    assert torch.equal(out[2], batch[2] / 0.25)
    assert torch.equal(out[1], batch[1]) and torch.equal(out[3], batch[3])


def test_temperature_zero_keeps_only_the_argmax() -> None:
    proc = processor()
    update(proc, 2, {0: entropy(0.0), 1: SamplingParams()})
    batch = logits(2)
    out = applied(proc, batch)
    best = int(batch[0].argmax())
    assert torch.isfinite(out[0, best])
    assert torch.isinf(out[0]).sum() == batch.shape[1] - 1
    assert out[0].argmax() == best
    assert torch.equal(out[1], batch[1])


def test_entropy_mode_follows_the_rule_and_snaps_to_the_set() -> None:
    proc = processor()
    update(proc, 3, {i: entropy(0.0, 0.5, 1.0, entropy_exponent=2.0) for i in range(3)})
    batch = torch.cat([torch.zeros(1, 10), torch.tensor([[60.0] + [0.0] * 9]), logits(1)])
    out = applied(proc, batch)
    wanted = normalized_entropy(batch[2:]).pow(2.0).item()
    middle = min((0.0, 0.5, 1.0), key=lambda t: abs(t - wanted))
    assert torch.equal(out[0], batch[0] / 1.0)  # uniform: the hottest
    assert torch.isinf(out[1]).sum() == 9  # certain: the coldest (0)
    if middle == 0.0:
        assert torch.isinf(out[2]).sum() == 9
    else:
        assert torch.equal(out[2], batch[2] / middle)


def test_without_opted_rows_the_batch_is_returned_as_is() -> None:
    proc = processor()
    update(proc, 2, {0: SamplingParams(), 1: SamplingParams(temperature=0.7)})
    batch = logits(2)
    assert proc.apply(batch) is batch
    proc.update_state(None)
    assert torch.equal(proc.apply(batch.clone()), batch)


def test_rows_keep_their_settings_when_the_batch_changes() -> None:
    proc = processor()
    update(
        proc,
        3,
        {0: entropy(0.5, record="a"), 1: SamplingParams(), 2: entropy(0.25, record="b")},
    )
    batch = logits(3)
    out = applied(proc, batch)
    assert torch.equal(out[0], batch[0] / 0.5) and torch.equal(out[2], batch[2] / 0.25)

    # Row 1 finishes; vLLM condenses the batch by moving the last row into the hole.
    update(proc, 2, removed=(1,), moved=((2, 1, MoveDirectionality.UNIDIRECTIONAL),))
    batch = logits(2, seed=1)
    out = applied(proc, batch)
    assert torch.equal(out[0], batch[0] / 0.5) and torch.equal(out[1], batch[1] / 0.25)

    update(proc, 2, moved=((0, 1, MoveDirectionality.SWAP),))
    batch = logits(2, seed=2)
    out = applied(proc, batch)
    assert torch.equal(out[0], batch[0] / 0.25) and torch.equal(out[1], batch[1] / 0.5)

    # A swap with a row that did not opt in moves the untreated row too.
    update(proc, 3, {2: SamplingParams()}, moved=((1, 2, MoveDirectionality.SWAP),))
    batch = logits(3, seed=3)
    out = applied(proc, batch)
    assert torch.equal(out[0], batch[0] / 0.25)
    assert torch.equal(out[1], batch[1])
    assert torch.equal(out[2], batch[2] / 0.5)

    # Each record followed its request through the moves.
    assert proc.take_records(["a", "b"]) == {"a": [0.5] * 4, "b": [0.25] * 4}


def test_an_added_request_replaces_the_row_it_lands_on() -> None:
    proc = processor()
    update(proc, 1, {0: entropy(0.5, record="a")})
    applied(proc, logits(1))
    update(proc, 1, {0: SamplingParams()})  # no removal reported: the add replaces it
    batch = logits(1)
    assert torch.equal(applied(proc, batch), batch)
    assert proc.take_records(["a"]) == {"a": [0.5]}


def test_removed_rows_free_their_slots() -> None:
    proc = processor()
    for _ in range(3):  # more requests over time than rows: slots must come back
        update(proc, MAX_ROWS, {i: entropy(0.5) for i in range(MAX_ROWS)})
        applied(proc, logits(MAX_ROWS))
        update(proc, 0, removed=tuple(range(MAX_ROWS)))
        batch = logits(MAX_ROWS)
        assert proc.apply(batch) is batch


def test_records_are_returned_once_whether_finished_or_still_active() -> None:
    proc = processor()
    update(proc, 2, {0: entropy(0.5, record="a"), 1: entropy(0.25, record="b")})
    applied(proc, logits(2))
    applied(proc, logits(2, seed=1))
    # "a" is still in the batch (its last token sampled, its removal not yet seen).
    assert proc.take_records(["a", "unknown"]) == {"a": [0.5, 0.5]}
    applied(proc, logits(2, seed=2))
    assert proc.take_records(["a"]) == {}
    update(proc, 1, removed=(0,), moved=((1, 0, MoveDirectionality.UNIDIRECTIONAL),))
    applied(proc, logits(1))
    assert proc.take_records(["a", "b"]) == {"b": [0.25] * 4}  # "a" is not kept on leaving
    assert proc.take_records(["b"]) == {}  # finished records are read once


def test_a_preempted_request_continues_its_record() -> None:
    proc = processor()
    update(proc, 1, {0: entropy(0.5, record="a")})
    for seed in range(3):
        applied(proc, logits(1, seed=seed))
    update(proc, 0, removed=(0,))
    # It comes back with two generated tokens: the last two entries are kept.
    update(proc, 1, {0: entropy(0.25, record="a")}, output=[7, 8])
    applied(proc, logits(1))
    assert proc.take_records(["a"]) == {"a": [0.5, 0.5, 0.25]}


def test_choose_forces_the_token_whose_id_is_the_chosen_index() -> None:
    proc = processor()
    update(
        proc,
        3,
        {
            0: entropy(0.5, 1.0, choose=True),
            1: entropy(0.5, 1.0, choose=True),
            2: SamplingParams(),
        },
    )
    batch = torch.cat([torch.zeros(1, 10), torch.tensor([[60.0] + [0.0] * 9]), logits(1)])
    out = applied(proc, batch)
    expected_rows = {0: 1, 1: 0}  # uniform: the hotter (index 1); certain: the colder (0)
    for row, index in expected_rows.items():
        assert out[row, index] == 0.0
        assert torch.isinf(out[row]).sum() == batch.shape[1] - 1
    assert torch.equal(out[2], batch[2])


def test_sample_mode_draws_from_the_rows_set() -> None:
    proc = processor()
    update(
        proc,
        MAX_ROWS,
        {
            i: opted(mode="sample", temperatures=[0.25, 0.5], record=f"r{i}")
            for i in range(MAX_ROWS)
        },
    )
    torch.manual_seed(0)
    for seed in range(10):
        applied(proc, logits(MAX_ROWS, seed=seed))
    records = proc.take_records([f"r{i}" for i in range(MAX_ROWS)])
    drawn = [t for values in records.values() for t in values]
    assert len(drawn) == 10 * MAX_ROWS
    assert set(drawn) == {0.25, 0.5}


@pytest.fixture
def learned(tmp_path: Path) -> tuple[TemperatureHead, torch.Tensor, dict[str, str], Path]:
    """A head trained (randomly) on a tiny model, as the engine would be configured."""
    head, matrix = random_head(), unembedding()
    model = model_folder(tmp_path / "model", matrix)
    manifest = HeadManifest(
        HEAD_TEMPERATURES, "token", HIDDEN, HEAD_HIDDEN, unembedding_fingerprint(matrix)
    )
    save_head(head, manifest, tmp_path / "head")
    foreign = HeadManifest(
        HEAD_TEMPERATURES, "token", HIDDEN, HEAD_HIDDEN, unembedding_fingerprint(matrix[1:])
    )
    save_head(head, foreign, tmp_path / "foreign")
    paths = {"h": str(tmp_path / "head"), "foreign": str(tmp_path / "foreign")}
    return head, matrix, paths, model


def test_learned_head_picks_the_heads_argmax_from_logits(learned) -> None:
    head, matrix, paths, model = learned
    proc = processor(paths, model)
    hidden = torch.randn(MAX_ROWS, HIDDEN, generator=torch.Generator().manual_seed(2))
    batch = hidden @ matrix.T
    with torch.no_grad():
        scores = head(hidden)
    wanted = scores.argmax(-1)
    assert len(set(wanted.tolist())) >= 2

    update(
        proc,
        MAX_ROWS,
        {
            i: opted(mode="learned", head="h", temperatures=list(HEAD_TEMPERATURES), choose=True)
            for i in range(MAX_ROWS)
        },
    )
    out = applied(proc, batch)
    assert out.argmax(-1).tolist() == wanted.tolist()

    # A subset of the head's set: the best of the allowed, as an index into the row's list.
    subset = [HEAD_TEMPERATURES[1], HEAD_TEMPERATURES[3]]
    update(
        proc,
        MAX_ROWS,
        {
            i: opted(mode="learned", head="h", temperatures=subset, choose=True)
            for i in range(MAX_ROWS)
        },
    )
    out = applied(proc, batch)
    assert out.argmax(-1).tolist() == scores[:, [1, 3]].argmax(-1).tolist()


def test_learned_head_scales_and_records(learned) -> None:
    head, matrix, paths, model = learned
    proc = processor(paths, model)
    hidden = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(5))
    batch = hidden @ matrix.T
    with torch.no_grad():
        chosen = [HEAD_TEMPERATURES[i] for i in head(hidden).argmax(-1).tolist()]
    spec = {"mode": "learned", "head": "h", "temperatures": list(HEAD_TEMPERATURES)}
    update(proc, 3, {i: opted(**spec, record=f"r{i}") for i in range(3)})
    out = applied(proc, batch)
    records = proc.take_records(["r0", "r1", "r2"])
    assert [records[f"r{i}"] for i in range(3)] == [[pytest.approx(t)] for t in chosen]
    for row, temperature in enumerate(chosen):
        if temperature == 0.0:
            assert torch.isinf(out[row]).sum() == VOCAB - 1
        else:
            torch.testing.assert_close(out[row], batch[row] / temperature)


def test_a_head_for_another_model_is_not_loaded_and_its_rows_run_at_one(learned) -> None:
    _, _, paths, model = learned
    proc = processor(paths, model)
    batch = logits(1)
    update(proc, 1, {0: opted(mode="learned", head="foreign", temperatures=[0.4], record="f")})
    assert torch.equal(applied(proc, batch), batch)
    assert proc.take_records(["f"]) == {"f": [1.0]}


def test_sampling_with_a_head_never_leaves_the_rows_set(learned) -> None:
    _, matrix, paths, model = learned
    proc = processor(paths, model)
    subset = [HEAD_TEMPERATURES[0], HEAD_TEMPERATURES[2]]
    update(
        proc,
        MAX_ROWS,
        {
            i: opted(mode="sample", head="h", temperatures=subset, record=f"r{i}")
            for i in range(MAX_ROWS)
        },
    )
    torch.manual_seed(0)
    for seed in range(5):
        hidden = torch.randn(MAX_ROWS, HIDDEN, generator=torch.Generator().manual_seed(seed))
        applied(proc, hidden @ matrix.T)
    records = proc.take_records([f"r{i}" for i in range(MAX_ROWS)])
    drawn = [t for values in records.values() for t in values]
    assert len(drawn) == 5 * MAX_ROWS
    assert {min(subset, key=lambda s, t=t: abs(s - t)) for t in drawn} == set(subset)
    assert all(any(t == pytest.approx(s) for s in subset) for t in drawn)


# --- validation of opted-in requests -----------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "conflict"),
    [
        ({"logit_bias": {5: 1.0}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "penalties"),
        ({"frequency_penalty": 0.5}, "penalties"),
        ({"repetition_penalty": 1.2}, "penalties"),
        ({"min_tokens": 3}, "min_tokens"),
        ({"temperature": 0.7}, "temperature other than 1"),
        ({"bad_words": ["owl"]}, "bad_words"),
        ({"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
        ({"structured_outputs": StructuredOutputsParams(json_object=True)}, "structured outputs"),
    ],
)
def test_opted_in_requests_refuse_settings_that_touch_the_logits(settings, conflict) -> None:
    spec = {EXTRA_ARGS_KEY: {"mode": "entropy", "temperatures": [0.5]}}
    params = SamplingParams(extra_args=spec, **settings)
    assert conflicting_settings(params) == [conflict]
    with pytest.raises(ValueError, match=conflict):
        AdaptiveTemperatureProcessor.validate_params(params)
    AdaptiveTemperatureProcessor.validate_params(SamplingParams(**settings))  # not opted in
    AdaptiveTemperatureProcessor.validate_params(SamplingParams(extra_args=spec))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("entropy", "not valid JSON"),
        ('"entropy"', "must be an object"),
        (7, "must be an object"),
        ('{"mode": "hot", "temperatures": [1.0]}', ".mode"),
        ({"mode": "hot", "temperatures": [1.0]}, ".mode"),
        ({"mode": "entropy"}, ".temperatures"),
        ({"mode": "entropy", "temperatures": []}, ".temperatures"),
        ({"mode": "entropy", "temperatures": [11.0]}, ".temperatures"),
        ({"mode": "entropy", "temperatures": ["hot"]}, ".temperatures"),
        ({"mode": "learned", "temperatures": [1.0]}, ".head"),
        ({"mode": "entropy", "temperatures": [1.0], "entropy_exponent": 0}, ".entropy_exponent"),
        ({"mode": "entropy", "temperatures": [1.0], "record": 5}, ".record"),
        ({"mode": "entropy", "temperatures": [1.0], "colour": 1}, "unknown fields ['colour']"),
    ],
)
def test_malformed_specs_name_the_field(spec, field: str) -> None:
    with pytest.raises(ValueError) as caught:
        RowSpec.parse({EXTRA_ARGS_KEY: spec})
    assert f"extra_args.{EXTRA_ARGS_KEY}" in str(caught.value)
    assert field in str(caught.value)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        AdaptiveTemperatureProcessor.validate_params(
            SamplingParams(extra_args={EXTRA_ARGS_KEY: spec})
        )


def test_row_spec_parses_a_valid_spec_and_ignores_other_requests() -> None:
    assert RowSpec.parse(None) is None
    assert RowSpec.parse({"other": 1}) is None
    spec = RowSpec.parse(
        {EXTRA_ARGS_KEY: {"mode": "learned", "head": "h", "temperatures": [0, 1], "choose": True}}
    )
    assert spec == RowSpec("learned", (0.0, 1.0), head="h", choose=True)


# --- the strategy over the fake engine ---------------------------------------------------------

STRATEGY = AdaptiveTemperature()
QUESTION = ({"role": "user", "content": "Describe owls."},)
EXAMPLE_HEAD = TemperatureHeadInfo("ex", "example", (0.0, 0.5, 1.0))
TOKEN_HEAD = TemperatureHeadInfo("tok", "token", (0.2, 0.6, 1.0))
HEADS = {"ex": EXAMPLE_HEAD, "tok": TOKEN_HEAD}


def three_words(prompt: str, sampling: SamplingSettings) -> list[str]:
    return ["alpha beta gamma"] * sampling.n


def adaptive_engine(**options: object) -> AdaptiveFakeEngine:
    return AdaptiveFakeEngine(script=three_words, temperature_heads=dict(HEADS), **options)


def make_ctx(
    engine: FakeEngine, *, n: int = 1, return_trace: bool = True, **sampling: object
) -> StrategyContext:
    values: dict[str, object] = {"max_tokens": 8, "seed": 7, "temperature": 0.7, **sampling}
    request = AlignmentRequest(
        messages=QUESTION,
        sampling=SamplingSettings(**values),  # type: ignore[arg-type]
        n=n,
        return_trace=return_trace,
        temperature_heads=(
            engine.temperature_heads if isinstance(engine, AdaptiveTemperatureEngine) else None
        ),
    )
    return StrategyContext(
        request=request,
        engine=MeteredEngine(engine),
        rewards=RewardResolver(lambda name: FakeReward()),
    )


def config(**values: object) -> AdaptiveTemperatureConfig:
    return AdaptiveTemperatureConfig.model_validate(values)


async def run(ctx: StrategyContext, cfg: AdaptiveTemperatureConfig):
    STRATEGY.check(ctx.request, cfg)
    return await STRATEGY.run(ctx, cfg)


def test_the_fake_engine_is_adaptive_only_when_asked() -> None:
    assert not isinstance(FakeEngine(), AdaptiveTemperatureEngine)
    assert isinstance(adaptive_engine(), AdaptiveTemperatureEngine)
    assert MeteredEngine(FakeEngine()).adaptive_temperature is None
    engine = adaptive_engine()
    assert MeteredEngine(engine).adaptive_temperature is engine


async def test_example_level_probes_then_samples_at_the_chosen_temperature() -> None:
    engine = adaptive_engine(chosen_index=1)
    ctx = make_ctx(engine, n=2)
    result = await run(ctx, config(level="example"))

    probe, reply = engine.calls
    assert probe.sampling.max_tokens == 1 and probe.sampling.n == 1
    assert probe.sampling.temperature == 1.0
    assert list(probe.sampling.extra_args) == [TEMPERATURE_KEY]
    assert temperature_spec(probe.sampling) == {
        "mode": "learned",
        "temperatures": [0.0, 0.5, 1.0],
        "entropy_exponent": 1.0,
        "head": "ex",
        "choose": True,
    }
    assert reply.sampling.temperature == 0.5
    assert reply.sampling.n == 2 and reply.sampling.max_tokens == 8
    assert reply.sampling.extra_args is None
    assert reply.raw_prompt == probe.raw_prompt  # the same prompt: the prefix cache serves it

    assert result.metadata == {
        "temperature_level": "example",
        "temperature_mode": "learned",
        "temperature_head": "ex",
        "temperature": 0.5,
    }
    assert [c.text for c in result.choices] == ["alpha beta gamma"] * 2
    assert [c.num_tokens for c in result.choices] == [3, 3]
    assert result.trace is not None
    assert result.trace["probe_token_id"] == 1
    assert result.trace["temperatures"] == [0.0, 0.5, 1.0]
    assert ctx.engine.usage.engine_calls == 2


async def test_example_level_choice_indexes_the_requested_subset() -> None:
    engine = adaptive_engine(chosen_index=1)
    result = await run(make_ctx(engine), config(head="ex", temperatures=[0.0, 1.0]))
    assert temperature_spec(engine.calls[0].sampling)["temperatures"] == [0.0, 1.0]
    assert engine.calls[1].sampling.temperature == 1.0
    assert result.metadata["temperature"] == 1.0


async def test_example_level_entropy_uses_the_default_set_without_a_head() -> None:
    engine = adaptive_engine(chosen_index=2)
    result = await run(make_ctx(engine), config(mode="entropy", entropy_exponent=2.0))
    spec = temperature_spec(engine.calls[0].sampling)
    assert spec == {
        "mode": "entropy",
        "temperatures": list(DEFAULT_TEMPERATURES),
        "entropy_exponent": 2.0,
        "choose": True,
    }
    assert engine.calls[1].sampling.temperature == DEFAULT_TEMPERATURES[2]
    assert result.metadata == {
        "temperature_level": "example",
        "temperature_mode": "entropy",
        "temperature": DEFAULT_TEMPERATURES[2],
    }


async def test_a_probe_the_processor_did_not_answer_is_an_engine_error() -> None:
    engine = adaptive_engine(chosen_index=len(EXAMPLE_HEAD.temperatures))  # out of range
    with pytest.raises(AdaptiveTemperatureUnavailable):
        await run(make_ctx(engine), config(level="example"))
    assert len(engine.calls) == 1


def token_record(prompt: str, sampling: SamplingSettings, tokens: int) -> list[float]:
    """A discarded prefill sample first, then one entry per token, slightly off the set."""
    per_seed = {7: [0.2, 0.6000001, 0.6], 8: [1.0, 0.9999999, 0.2]}
    assert sampling.seed is not None and tokens == 3
    return [0.6, *per_seed[sampling.seed]]


async def test_token_level_makes_one_recorded_call_per_choice() -> None:
    engine = adaptive_engine(record_script=token_record)
    ctx = make_ctx(engine, n=2)
    result = await run(ctx, config(level="token"))

    assert len(engine.calls) == 2
    calls = sorted(engine.calls, key=lambda call: call.sampling.seed or 0)
    assert [call.sampling.seed for call in calls] == [7, 8]
    keys = []
    for call in calls:
        assert call.sampling.n == 1 and call.sampling.temperature == 1.0
        assert call.sampling.max_tokens == 8
        spec = temperature_spec(call.sampling)
        assert {k: v for k, v in spec.items() if k != "record"} == {
            "mode": "learned",
            "temperatures": [0.2, 0.6, 1.0],
            "entropy_exponent": 1.0,
            "head": "tok",
        }
        assert "choose" not in spec
        keys.append(spec["record"])
    assert len(set(keys)) == 2
    assert engine.records == {}  # every record was read

    assert [c.text for c in result.choices] == ["alpha beta gamma"] * 2
    metadata = result.metadata
    assert metadata["temperature_level"] == "token"
    assert metadata["temperature_mode"] == "learned"
    assert metadata["temperature_head"] == "tok"
    assert metadata["temperature_histogram"] == {"0.2": 2, "0.6": 2, "1": 2}
    assert metadata["temperature_mean"] == pytest.approx((0.2 + 0.6 + 0.6 + 1 + 1 + 0.2) / 6)
    assert result.trace is not None
    assert result.trace["choices"] == [
        {"index": 0, "token_temperatures": [0.2, 0.6, 0.6]},
        {"index": 1, "token_temperatures": [1.0, 1.0, 0.2]},
    ]
    assert result.trace["temperatures"] == [0.2, 0.6, 1.0]


async def test_token_level_seeds_wrap_within_int64() -> None:
    engine = adaptive_engine()
    await run(make_ctx(engine, n=2, seed=2**63 - 1), config(level="token"))
    assert sorted(call.sampling.seed for call in engine.calls) == [-(2**63), 2**63 - 1]


async def test_token_level_streams_deltas_then_the_result() -> None:
    engine = adaptive_engine()
    ctx = make_ctx(engine, n=2, return_trace=False)
    cfg = config(level="token", mode="entropy", temperatures=[0.5, 1.0])
    STRATEGY.check(ctx.request, cfg)
    events = [event async for event in STRATEGY.stream(ctx, cfg)]
    *deltas, last = events
    assert all(isinstance(event, DeltaEvent) for event in deltas)
    assert len(deltas) == 6  # three tokens each
    assert isinstance(last, ResultEvent) and last.streamed
    for index in (0, 1):
        text = "".join(e.delta.text for e in deltas if e.delta.index == index)
        assert text == last.result.choices[index].text == "alpha beta gamma"
    assert last.result.trace is None
    assert last.result.metadata["temperature_histogram"] == {"0.5": 0, "1": 6}
    assert last.result.metadata["temperature_mean"] == 1.0


async def test_example_level_streams_deltas_then_the_result() -> None:
    engine = adaptive_engine(chosen_index=0)
    ctx = make_ctx(engine)
    events = [event async for event in STRATEGY.stream(ctx, config(level="example"))]
    *deltas, last = events
    assert [e.delta.text for e in deltas if isinstance(e, DeltaEvent)] == [
        "alpha",
        " beta",
        " gamma",
    ]
    assert len(deltas) == 3
    assert isinstance(last, ResultEvent) and last.streamed
    assert last.result.metadata["temperature"] == 0.0


async def test_fixed_mode_makes_no_probe_and_needs_no_adaptive_engine() -> None:
    engine = FakeEngine(script=three_words)
    result = await run(make_ctx(engine), config(mode="fixed", fixed_temperature=0.3))
    (call,) = engine.calls
    assert call.sampling.temperature == 0.3 and call.sampling.extra_args is None
    assert call.sampling.max_tokens == 8
    assert result.metadata == {
        "temperature_level": "example",
        "temperature_mode": "fixed",
        "temperature": 0.3,
    }

    engine = FakeEngine(script=three_words)
    result = await run(make_ctx(engine), config(mode="fixed"))  # the request's temperature
    assert engine.calls[0].sampling.temperature == 0.7
    assert result.metadata["temperature"] == 0.7


async def test_fixed_token_level_reports_every_token_at_the_fixed_temperature() -> None:
    engine = FakeEngine(script=three_words)
    result = await run(
        make_ctx(engine, n=2, logit_bias=((5, 1.0),)),  # fixed: nothing to conflict with
        config(level="token", mode="fixed", fixed_temperature=0.3),
    )
    assert len(engine.calls) == 2
    assert all(c.sampling.n == 1 and c.sampling.temperature == 0.3 for c in engine.calls)
    assert all(c.sampling.extra_args is None for c in engine.calls)
    assert result.metadata["temperature_histogram"] == {"0.3": 6}
    assert result.metadata["temperature_mean"] == pytest.approx(0.3)
    assert result.trace["choices"][1] == {"index": 1, "token_temperatures": [0.3] * 3}


def test_example_level_accepts_settings_the_probe_leaves_out() -> None:
    ctx = make_ctx(adaptive_engine(), logit_bias=((5, 1.0),), presence_penalty=0.5)
    STRATEGY.check(ctx.request, config(level="example"))


@pytest.mark.parametrize(
    ("cfg", "param"),
    [
        ({"head": "missing"}, "strategy_config.head"),
        ({"level": "token", "head": "ex"}, "strategy_config.head"),
        ({"level": "example", "head": "tok"}, "strategy_config.head"),
        ({"head": "ex", "temperatures": [0.5, 0.7]}, "strategy_config.temperatures"),
        ({"mode": "entropy", "temperatures": []}, "strategy_config.temperatures"),
        ({"mode": "entropy", "temperatures": [2.5]}, "strategy_config.temperatures"),
        ({"mode": "entropy", "temperatures": [0.1] * 17}, "strategy_config.temperatures"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(cfg: dict, param: str) -> None:
    ctx = make_ctx(adaptive_engine())
    with pytest.raises(InvalidStrategyRequest) as caught:
        STRATEGY.check(ctx.request, config(**cfg))
    assert caught.value.param == param


def test_learned_without_a_head_for_the_level_is_refused() -> None:
    engine = AdaptiveFakeEngine(temperature_heads={"ex": EXAMPLE_HEAD})
    with pytest.raises(InvalidStrategyRequest) as caught:
        STRATEGY.check(make_ctx(engine).request, config(level="token"))
    assert caught.value.param == "strategy_config.head"
    assert "ex" in str(caught.value)  # names what is configured


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"logit_bias": ((5, 1.0),)}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"min_tokens": 2}, "min_tokens"),
        ({"structured": StructuredOutput(json_object=True)}, "response_format"),
    ],
)
@pytest.mark.parametrize("mode", ["learned", "entropy"])
def test_token_level_refuses_settings_that_touch_the_logits(
    sampling: dict, param: str, mode: str
) -> None:
    ctx = make_ctx(adaptive_engine(), **sampling)
    with pytest.raises(InvalidStrategyRequest) as caught:
        STRATEGY.check(ctx.request, config(level="token", mode=mode))
    assert caught.value.param == param


@pytest.mark.parametrize("cfg", [{}, {"level": "token"}, {"mode": "entropy"}])
def test_an_engine_without_adaptive_support_is_refused(cfg: dict) -> None:
    ctx = make_ctx(FakeEngine())
    assert ctx.request.temperature_heads is None
    with pytest.raises(InvalidStrategyRequest) as caught:
        STRATEGY.check(ctx.request, config(**cfg))
    assert caught.value.param == "strategy"


# --- through the HTTP API ----------------------------------------------------------------------


def post(engine: FakeEngine, body: dict) -> httpx.Response:
    app = create_app(fake_settings(), engine_factory=lambda _: engine)
    with serve_in_thread(app) as server:
        return httpx.post(
            f"{server.api_url}/chat/completions",
            json={"model": "fake-model", "messages": list(QUESTION), **body},
            timeout=30,
        )


def test_api_reports_the_chosen_temperature() -> None:
    engine = adaptive_engine(chosen_index=2)
    response = post(engine, {"strategy": "adaptive_temperature", "max_tokens": 8})
    assert response.status_code == 200, response.text
    alignment = response.json()["alignment"]
    assert alignment["strategy"] == "adaptive_temperature"
    assert alignment["temperature"] == 1.0
    assert alignment["temperature_head"] == "ex"
    assert response.json()["choices"][0]["message"]["content"] == "alpha beta gamma"
    assert engine.calls[0].sampling.max_tokens == 1


@pytest.mark.parametrize(
    ("make_engine", "strategy_config", "param"),
    [
        (adaptive_engine, {"head": "missing"}, "strategy_config.head"),
        (FakeEngine, {}, "strategy"),
    ],
)
def test_api_refuses_with_an_openai_shaped_400(
    make_engine: type[FakeEngine], strategy_config: dict, param: str
) -> None:
    engine = make_engine()
    response = post(
        engine, {"strategy": "adaptive_temperature", "strategy_config": strategy_config}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert engine.calls == []


def test_a_spec_flattened_to_json_parses_as_the_object() -> None:
    spec = {"mode": "learned", "head": "h", "temperatures": [0, 1], "record": "k"}
    flat = RowSpec.parse({EXTRA_ARGS_KEY: json.dumps(spec)})
    assert flat == RowSpec.parse({EXTRA_ARGS_KEY: spec})
    assert flat is not None and flat.head == "h" and flat.record == "k"
