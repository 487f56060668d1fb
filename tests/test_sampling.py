"""Token selection from logits split on the vocabulary (tp_gpu.models.sampling).

Greedy against ``np.argmax`` of the dense float64 logits made from the head's own logical weight; sampled
tokens identical for one seed at every worker count, backend and process count; a chi-square test of
the sampled distribution against a dense reference of transformers' warpers written here (and checked
against transformers itself where it imports); tokens outside top-k / top-p never drawn; the
communication of each mode; an error for every bad input. Padded places hold NaN, which would win
every row if it leaked.
"""

from __future__ import annotations

import math
import re
import statistics
import threading

import numpy as np
import pytest
from conftest import WORKER_COUNTS

import tp_gpu
from tp_gpu import (
    ColumnParallelLinear,
    ConfigError,
    ParallelEmbedding,
    ShapeError,
    ShardedTensor,
    TiedLMHead,
    collectives,
    get_backend,
    worker_devices,
)
from tp_gpu.models.sampling import SamplingConfig, greedy_tokens, keyed_uniform, next_tokens, sample_tokens
from tp_gpu.partition import BlockLayout

HIDDEN = 16
#: (vocabulary, pad_to_multiple_of, head): odd sizes, padded and not, both heads.
HEADS = [(997, None, "column"), (1031, 8, "tied"), (1031, 64, "column"), (997, 64, "tied")]
SAMPLED = [
    SamplingConfig(do_sample=True, seed=3),
    SamplingConfig(do_sample=True, temperature=0.7, top_k=7, seed=3),
    SamplingConfig(do_sample=True, temperature=1.3, top_p=0.9, seed=3),
    SamplingConfig(do_sample=True, top_k=20, top_p=0.8, seed=3),
]


def head_logits(make_config, n_workers, vocab, pad, kind, x, dtype="float64"):
    """The logits of a vocabulary head on ``x`` (B, H), split on the vocabulary, and the head's
    logical weight ``(H, V)``."""
    config = make_config(n_workers, gather_output=False, dtype=dtype)
    if kind == "column":
        head = ColumnParallelLinear(HIDDEN, vocab, config, bias=False, pad_to_multiple_of=pad, seed=5)
        return head(x), head.full_weight()
    embedding = ParallelEmbedding(vocab, HIDDEN, config, pad_to_multiple_of=pad, seed=5)
    return TiedLMHead(embedding)(x), embedding.full_weight().T


def split_logits(backend, n_workers, z, pad=None, dtype=np.float64, rank=0, world=1, comm=None):
    """Dense host logits ``z`` (B, V) as a Tensor split on the vocabulary, padding filled with NaN."""
    devices = worker_devices(n_workers, backend.devices)
    layout = BlockLayout.split(z.shape[1], devices, rank, world, pad_to_multiple_of=pad)
    blocks = collectives.scatter_blocks(backend, z, 1, layout, dtype)
    for d, block in blocks.items():
        mask = layout.logical_mask(np, d)
        if mask is not None:
            with backend.device(d):
                block[:, np.flatnonzero(~mask)] = np.nan
    return ShardedTensor.from_blocks(blocks, -1, layout, backend, comm)


def warped(z, temperature=1.0, top_k=None, top_p=None):
    """transformers' Temperature -> TopK -> TopP warpers on rows ``z`` (B, V), in float64 NumPy."""
    s = np.asarray(z, dtype=np.float64) / temperature
    if top_k:
        kth = -np.sort(-s, axis=-1)[:, min(top_k, s.shape[1]) - 1 : min(top_k, s.shape[1])]
        s = np.where(s < kth, -np.inf, s)
    if top_p is not None and top_p < 1:
        order = np.argsort(s, axis=-1, kind="stable")
        ascending = np.take_along_axis(s, order, axis=-1)
        e = np.exp(ascending - ascending[:, -1:])
        removed = np.cumsum(e / e.sum(axis=-1, keepdims=True), axis=-1) <= 1 - top_p
        removed[:, -1] = False
        drop = np.zeros(s.shape, dtype=bool)
        np.put_along_axis(drop, order, removed, axis=-1)
        s = np.where(drop, -np.inf, s)
    return s


def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------- greedy


@pytest.mark.parametrize("vocab, pad, kind", HEADS)
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_greedy_equals_dense_argmax(make_config, rng, n_workers, vocab, pad, kind):
    x = rng.standard_normal((7, HIDDEN)) * 4
    logits, weight = head_logits(make_config, n_workers, vocab, pad, kind, x)
    tokens = greedy_tokens(logits)
    assert tokens.dtype == np.int64 and tokens.shape == (7,)
    np.testing.assert_array_equal(tokens, np.argmax(x @ weight, axis=-1))  # (7, H) @ (H, V)
    off = SamplingConfig(temperature=0.5, top_k=3, seed=9)  # do_sample=False: greedy, warpers unused
    np.testing.assert_array_equal(next_tokens(logits, off, 4), tokens)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_greedy_in_low_precision_is_the_argmax_of_those_logits(make_config, rng, n_workers, dtype):
    x = rng.standard_normal((6, HIDDEN)) * 4
    logits, _ = head_logits(make_config, n_workers, 1031, 64, "column", x, dtype)
    np.testing.assert_array_equal(greedy_tokens(logits), np.argmax(np.asarray(logits), axis=-1))


def tie_rows(rng, vocab):
    """Integer logits full of ties, a row of -inf, a row with two NaN, a row with two +inf, one flat row."""
    z = rng.integers(-3, 3, size=(7, vocab)).astype(np.float64)
    z[1] = -np.inf
    z[2, [40, 9]] = np.nan
    z[3, [50, 17]] = np.inf
    z[4] = 2.0
    z[5, -1] = 10.0  # the last id wins alone
    return z


@pytest.mark.parametrize("pad", [None, 8])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_greedy_ties_go_to_the_smallest_id_and_nan_wins(backend_spec, rng, n_workers, pad):
    z = tie_rows(rng, 61)
    tokens = greedy_tokens(split_logits(get_backend(*backend_spec), n_workers, z, pad))
    np.testing.assert_array_equal(tokens, np.argmax(z, axis=-1))  # first maximum, first NaN
    assert tokens[1] == 0 and tokens[2] == 9 and tokens[3] == 17 and tokens[4] == 0 and tokens[5] == 60


def test_more_workers_than_tokens_and_no_rows(rng):
    """Three tokens over 8 workers (empty blocks, blocks of padding only), and a batch of no rows."""
    z = rng.standard_normal((4, 3))
    config = SamplingConfig(top_k=5, seed=2)  # k > V: every token kept
    expected = sample_tokens(split_logits(get_backend("numpy"), 1, z), config, 0)
    for spec, pad in [(("simulated", 8), None), (("simulated", 8), 8), (("numpy", None), 8)]:
        logits = split_logits(get_backend(*spec), 8, z, pad)
        np.testing.assert_array_equal(greedy_tokens(logits), np.argmax(z, axis=-1))
        np.testing.assert_array_equal(sample_tokens(logits, config, 0), expected)
    empty = split_logits(get_backend("simulated", 3), 5, np.zeros((0, 13)), 8)
    for config in SAMPLED[:3]:
        assert next_tokens(empty, config, 0).shape == (0,)


def test_greedy_ties_as_torch_argmax(rng):
    torch = pytest.importorskip("torch")
    z = tie_rows(rng, 61)
    tokens = greedy_tokens(split_logits(get_backend("simulated", 3), 5, z, 8))
    np.testing.assert_array_equal(tokens, torch.argmax(torch.from_numpy(z), dim=-1).numpy())


# ---------------------------------------------------------------------- sampling: the same everywhere


@pytest.fixture(scope="module")
def spread_logits():
    """(6, 1031) logits of some spread; every row differs."""
    return np.random.default_rng(11).standard_normal((6, 1031)) * 3


@pytest.fixture(scope="module")
def reference_tokens(spread_logits):
    logits = split_logits(get_backend("numpy"), 1, spread_logits)
    return [sample_tokens(logits, config, 5) for config in SAMPLED]


@pytest.mark.parametrize("pad", [None, 64])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_sampled_tokens_equal_at_every_worker_count(
    backend_spec, n_workers, pad, spread_logits, reference_tokens
):
    logits = split_logits(get_backend(*backend_spec), n_workers, spread_logits, pad)
    for config, expected in zip(SAMPLED, reference_tokens):
        np.testing.assert_array_equal(next_tokens(logits, config, 5), expected, err_msg=repr(config))


def test_seeds_steps_and_rows_give_different_tokens():
    """One prompt in 16 rows over a flat vocabulary: each row, seed and step draws anew."""
    z = np.tile(np.random.default_rng(0).standard_normal(997) * 0.1, (16, 1))
    logits = split_logits(get_backend("simulated", 3), 4, z, 8)
    base = sample_tokens(logits, SamplingConfig(seed=1), 0)
    assert len(set(base.tolist())) >= 14  # rows sample independently
    np.testing.assert_array_equal(sample_tokens(logits, SamplingConfig(seed=1), 0), base)
    for other in (
        sample_tokens(logits, SamplingConfig(seed=2), 0),
        sample_tokens(logits, SamplingConfig(seed=1), 1),
    ):
        assert (other != base).sum() >= 14


def test_top_k_one_and_a_low_temperature_are_greedy(spread_logits):
    logits = split_logits(get_backend("simulated", 3), 5, spread_logits, 8)
    greedy = greedy_tokens(logits)
    for step in range(3):
        np.testing.assert_array_equal(sample_tokens(logits, SamplingConfig(top_k=1), step), greedy)
        np.testing.assert_array_equal(sample_tokens(logits, SamplingConfig(temperature=1e-4), step), greedy)
    all_kept = sample_tokens(logits, SamplingConfig(top_k=1031, seed=4), 2)
    np.testing.assert_array_equal(all_kept, sample_tokens(logits, SamplingConfig(seed=4), 2))


def test_keyed_uniform_is_open_uniform_and_keyed():
    rows, columns = np.arange(40, dtype=np.uint64)[:, None], np.arange(2500, dtype=np.uint64)[None, :]
    u = keyed_uniform(np, 7, 3, rows, columns, 2500)
    assert u.dtype == np.float64 and u.shape == (40, 2500) and 0 < u.min() and u.max() < 1
    counts = np.bincount((u * 10).astype(int).ravel(), minlength=10)  # 10,000 expected per bin
    assert np.abs(counts - 10_000).max() < 600  # 6 standard deviations
    assert keyed_uniform(np, 7, 3, 5, 17, 2500) == u[5, 17]
    for other in ((8, 3), (7, 4)):
        assert np.mean(keyed_uniform(np, *other, rows, columns, 2500) == u) < 1e-4


# ---------------------------------------------------------------------- sampling: the distribution

#: Eleven logits: some close, one far below, a tie (ids 2 and 7).
SMALL = np.array([1.2, 0.3, 0.9, -0.4, 2.0, 0.1, -1.5, 0.9, 0.6, -3.0, 1.6])
DISTRIBUTIONS = [
    dict(),
    dict(temperature=0.5),
    dict(temperature=2.0, top_k=4),
    dict(top_k=3),  # 0.9 is the 4th largest: top_k=3 cuts between 1.2 and the 0.9 pair
    dict(top_p=0.8),
    dict(temperature=1.5, top_k=8, top_p=0.7),
]
#: A false failure of the chi-square test has probability at most ALPHA per case (the Wilson-Hilferty
#: threshold errs high; the draws are seeded, so a given seed passes or fails for good).
ALPHA = 1e-6


def chi_square_quantile(df: int, alpha: float = ALPHA) -> float:
    """The upper ``alpha`` quantile of chi-square with ``df`` degrees of freedom, by Wilson and Hilferty
    (1931): ``df (1 - 2/(9 df) + z sqrt(2/(9 df)))^3`` with ``z`` the normal quantile."""
    z = statistics.NormalDist().inv_cdf(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_wilson_hilferty_quantile_is_conservative():
    """At 1..10 degrees of freedom the approximation errs high: the exact false-failure rate at its
    threshold lies between 1.5e-7 and ALPHA (scipy's exact tail)."""
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 11):
        assert 1.5e-7 < stats.chi2.sf(chi_square_quantile(df), df) < ALPHA


def chi_square(counts, p):
    """Pearson's statistic of ``counts`` against probabilities ``p`` (zeros left out) and its degrees of
    freedom. The cells expecting fewest draws are pooled until every cell expects 5 or more, where the
    chi-square law holds."""
    expected, observed = np.sort(counts.sum() * p[p > 0]), counts[p > 0][np.argsort(p[p > 0])]
    pooled = 1
    while pooled < len(expected) and (expected[:pooled].sum() < 5 or expected[pooled] < 5):
        pooled += 1
    e = np.concatenate([[expected[:pooled].sum()], expected[pooled:]])
    o = np.concatenate([[observed[:pooled].sum()], observed[pooled:]])
    return float(((o - e) ** 2 / e).sum()), len(e) - 1


@pytest.mark.parametrize("warpers", DISTRIBUTIONS, ids=lambda w: "-".join(f"{k}{v}" for k, v in w.items()))
def test_sampled_distribution_is_the_warped_softmax(warpers):
    rows, steps = 250, 80  # 20,000 draws
    logits = split_logits(get_backend("simulated", 3), 3, np.tile(SMALL, (rows, 1)), 8)  # a worker holds none
    config = SamplingConfig(do_sample=True, seed=12, **warpers)
    draws = np.concatenate([next_tokens(logits, config, step) for step in range(steps)])
    counts = np.bincount(draws, minlength=11)
    p = softmax(warped(SMALL[None], **warpers))[0]
    assert counts[p == 0].sum() == 0, f"drew removed tokens: {counts}, p={p}"
    statistic, df = chi_square(counts, p)
    assert statistic < chi_square_quantile(df), (statistic, df, counts, p * counts.sum())
    wrong = softmax(warped(SMALL[None], **{**warpers, "temperature": warpers.get("temperature", 1) * 1.3}))[0]
    assert ((wrong > 0) == (p > 0)).all()  # the test can fail: a temperature 30% off is rejected
    wrong_statistic, wrong_df = chi_square(counts, wrong)
    assert wrong_statistic > chi_square_quantile(wrong_df)


@pytest.mark.parametrize(
    "warpers", [dict(top_k=5), dict(top_p=0.5), dict(temperature=0.8, top_k=40, top_p=0.6)]
)
def test_tokens_outside_the_kept_set_are_never_drawn(rng, warpers):
    z = rng.standard_normal((8, 997)) * 2
    logits = split_logits(get_backend("simulated", 3), 5, z, 64)
    kept = np.isfinite(warped(z, **warpers))
    draws = np.stack([sample_tokens(logits, SamplingConfig(seed=1, **warpers), s) for s in range(40)])
    assert kept[np.arange(8), draws].all()
    assert max(len(set(column)) for column in draws.T.tolist()) >= 3  # it does sample


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_logits_sample_from_their_own_values(dtype):
    z = (np.random.default_rng(4).standard_normal((8, 1031)) * 3).astype(dtype)
    config = SamplingConfig(top_k=30, top_p=0.9, temperature=0.9, seed=2)
    tokens = [
        sample_tokens(split_logits(get_backend("simulated", 3), n, z, 8, dtype), config, 1) for n in (1, 4)
    ]
    np.testing.assert_array_equal(tokens[0], tokens[1])
    assert np.isfinite(warped(z, 0.9, 30, 0.9))[np.arange(8), tokens[0]].all()


def test_reference_warpers_equal_transformers(rng):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.generation import logits_process as hf

    z = rng.standard_normal((40, 50)) * 2
    for w in DISTRIBUTIONS[1:] + [dict(top_k=60), dict(temperature=0.3, top_p=0.95)]:
        scores = torch.from_numpy(z.copy())
        scores = hf.TemperatureLogitsWarper(w.get("temperature", 1.0))(None, scores)
        if w.get("top_k"):
            scores = hf.TopKLogitsWarper(w["top_k"])(None, scores)
        if w.get("top_p"):
            scores = hf.TopPLogitsWarper(w["top_p"])(None, scores)
        ours = warped(z, **w)
        np.testing.assert_array_equal(np.isfinite(ours), torch.isfinite(scores).numpy(), err_msg=str(w))
        np.testing.assert_allclose(softmax(ours), torch.softmax(scores, -1).numpy(), rtol=1e-12, atol=1e-15)


def test_ties_across_the_top_p_cut_are_all_kept():
    """Four equal logits and top_p=0.5: transformers keeps two of them (those its sort puts last); the
    threshold keeps all four (documented), each drawn with probability 1/4."""
    z = np.tile([0.0, 0.0, -5.0, 0.0, 0.0, -6.0], (200, 1))
    logits = split_logits(get_backend("simulated", 3), 4, z, 8)
    draws = np.concatenate([sample_tokens(logits, SamplingConfig(top_p=0.5), s) for s in range(20)])
    counts = np.bincount(draws, minlength=6)
    assert counts[[2, 5]].sum() == 0
    statistic, df = chi_square(counts, np.array([0.25, 0.25, 0, 0.25, 0.25, 0]))
    assert statistic < chi_square_quantile(df)


# ---------------------------------------------------------------------- communication


@pytest.mark.parametrize(
    "config, largest",
    [(None, 8), (SamplingConfig(seed=1), 8), (SamplingConfig(top_k=4, seed=1), 8 * 4)],
    ids=["greedy", "sampled", "top_k"],
)
def test_only_pairs_and_candidates_cross_devices(config, largest):
    """Greedy and sampling without top-p move (value, id) pairs (and top-k's candidates), never logits."""
    rows, backend = 5, get_backend("simulated", 8)
    z = np.random.default_rng(1).standard_normal((rows, 1031))
    logits = split_logits(backend, 8, z, 64)
    backend.reset_transfers()
    tokens = greedy_tokens(logits) if config is None else sample_tokens(logits, config, 0)
    copies = backend.transfers.values()
    assert max(nbytes / count for count, nbytes in copies) <= largest * rows  # one (B,) or (B, k) array
    assert sum(nbytes for _, nbytes in copies) <= 7 * (16 + largest + 8) * rows  # each device: pair, k, tau
    assert sum(count for count, _ in backend.host_reads.values()) == 1  # the tokens, once
    assert tokens.shape == (rows,)


class ThreadComm:
    """Rank ``rank`` of processes simulated by threads: every collective meets at a barrier."""

    def __init__(self, rank, shared):
        self.rank, self.size, self.shared = rank, len(shared["slots"]), shared
        self.name, self.gathered = "threads", []

    def _exchange(self, backend, array):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = np.array(backend.to_host(array))
        barrier.wait()
        pieces = list(slots)
        barrier.wait()
        return pieces

    def all_gather(self, backend, array, axis):
        self.gathered.append(tuple(array.shape))
        whole = np.concatenate(self._exchange(backend, array), axis=axis)
        return backend.asarray(whole, array.dtype, backend.device_of(array))

    def all_reduce(self, backend, array, op="sum"):
        pieces = self._exchange(backend, array)
        total = np.sum(pieces, axis=0) if op == "sum" else np.max(pieces, axis=0)
        return backend.asarray(total, array.dtype, backend.device_of(array))


@pytest.mark.parametrize("backend_name, devices", [("numpy", None), ("simulated", 3)])
@pytest.mark.parametrize("pad", [None, 8])
def test_several_processes_agree_with_one(spread_logits, reference_tokens, backend_name, devices, pad):
    """Three processes of two workers each (threads, one communicator) pick the one-process tokens."""
    world, backend = 3, get_backend(backend_name, devices)
    configs = [SamplingConfig()] + SAMPLED
    expected = [greedy_tokens(split_logits(backend, 1, spread_logits))] + reference_tokens
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=60)}
    results, errors = {}, []

    def run(rank):
        try:
            comm = ThreadComm(rank, shared)
            logits = split_logits(backend, 2, spread_logits, pad, rank=rank, world=world, comm=comm)
            results[rank] = ([next_tokens(logits, c, 5) for c in configs], comm.gathered)
        except BaseException as exc:  # noqa: B036  # reported below, after the other ranks stop
            errors.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for tokens, gathered in results.values():
        for got, want, config in zip(tokens, expected, configs):
            np.testing.assert_array_equal(got, want, err_msg=repr(config))
        # greedy, sampled: pairs; top_k: candidates, pairs; top_p (and both): the rows, longest span
        span = 344 if pad is None else 352  # 1031 over 6 workers: 172 each but one; padded: 176 each
        assert gathered == [(1, 2, 6), (1, 2, 6), (6, 7), (1, 2, 6), (6, span), (6, span)]


# ---------------------------------------------------------------------- bad inputs


BAD_CONFIGS = {
    "temperature": (0, -1.0, float("nan"), float("inf"), True, "1"),
    "top_k": (0.5, -1, True, "3"),
    "top_p": (0, 1.5, -0.1, float("nan"), True),
    "seed": (-1, 1.0, False),
    "do_sample": ("yes", None),
}


@pytest.mark.parametrize("field, value", [(f, v) for f, values in BAD_CONFIGS.items() for v in values])
def test_bad_config(field, value):
    with pytest.raises(ConfigError, match=rf"{field} must .* got {re.escape(repr(value))}"):
        SamplingConfig(**{field: value})


def test_off_values_are_stored_as_none():
    config = SamplingConfig(top_k=0, top_p=1.0, temperature=2)
    assert (config.top_k, config.top_p, config.temperature) == (None, None, 2.0)


@pytest.fixture(scope="module")
def small_logits():
    return split_logits(get_backend("simulated", 3), 4, np.zeros((2, 13)))


def test_bad_logits(small_logits):
    backend = get_backend("simulated", 3)
    three_d = ShardedTensor([backend.asarray(np.zeros((2, 3, 4)), np.float64, 0)], -1, [0], backend)
    on_rows = ShardedTensor([backend.asarray(np.zeros((2, 4)), np.float64, 0)], 0, [0], backend)
    integers = ShardedTensor([backend.asarray(np.zeros((2, 4)), np.int64, 0)], -1, [0], backend)
    cases = [
        (np.zeros((2, 13)), r"tp_gpu.Tensor .* got ndarray"),
        (tp_gpu.tensor(np.zeros((2, 13))), r"placed Split\(-1\).* got shape \(2, 13\) placed Dense"),
        (three_d, r"2-D .* got shape \(2, 3, 4\)"),
        (on_rows, r"got shape \(2, 4\) placed Split\(axis=0"),
        (integers, r"floating-point .* got dtype int64"),
    ]
    for bad, pattern in cases:
        for call in (greedy_tokens, lambda x: sample_tokens(x, SamplingConfig(), 0)):
            with pytest.raises(ShapeError, match=pattern):
                call(bad)


@pytest.mark.parametrize("step, pattern", [(-1, "got -1"), (1.5, "got 1.5"), (True, "got True")])
def test_bad_step(small_logits, step, pattern):
    for call in (sample_tokens, next_tokens):
        with pytest.raises(ConfigError, match=f"step must be a non-negative integer, {pattern}"):
            call(small_logits, SamplingConfig(), step)


def test_bad_config_object_and_keys(small_logits):
    with pytest.raises(ConfigError, match="config must be a SamplingConfig, got dict"):
        next_tokens(small_logits, {"do_sample": True}, 0)
    with pytest.raises(ConfigError, match="vocab_size must be a positive integer, got 0"):
        keyed_uniform(np, 0, 0, 1, 1, 0)
    with pytest.raises(ConfigError, match="seed must be a non-negative integer, got -2"):
        keyed_uniform(np, -2, 0, 1, 1, 5)
