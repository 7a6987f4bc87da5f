"""The per-item sampler draws from the right distribution; temperature, top-p and no-repeat-n-gram really apply.

Distributions are checked with Pearson's χ² goodness-of-fit test on a fixed 6-token distribution: 20,000 draws
(one per row, each row with its own seeded generator, as in generation) against the probabilities computed here
by hand: softmax(logits / T), then the nucleus — the most probable tokens until their mass reaches top_p —
renormalised. Seeds are fixed, so each test is deterministic; the threshold p > 1e-3 is what a correct sampler
passes. The χ² tail comes from torch's regularised incomplete gamma function.
"""

from __future__ import annotations

import math

import pytest
import torch
from _eval_helpers import make_gpt2, make_tokenizer
from _kd_helpers import one_thread
from torch import nn

from dwakd.evaluation.generation import GenerationSettings, PerItemSampler, generate_batch

LOGITS = [2.0, 1.5, 1.0, 0.5, -0.5, -1.5]  # a fixed small distribution, all tokens distinct in probability
DRAWS = 20_000


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def nucleus(probs: list[float], top_p: float) -> list[float]:
    """Keep the most probable tokens until their mass reaches top_p (the one that crosses it included)."""
    order = sorted(range(len(probs)), key=lambda k: -probs[k])
    kept, mass = set(), 0.0
    for k in order:
        if mass >= top_p:
            break
        kept.add(k)
        mass += probs[k]
    return [probs[k] / mass if k in kept else 0.0 for k in range(len(probs))]


def draw(settings: GenerationSettings, logits: list[float] = LOGITS, n: int = DRAWS, seed: int = 0) -> list[int]:
    """How often each token is drawn in n rows (one draw each, every row its own generator)."""
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + row) for row in range(n)]
    sampler = PerItemSampler(generators, len(logits), settings)
    scores = torch.tensor([logits], dtype=torch.float32).expand(n, -1)
    out = sampler(torch.zeros((n, 1), dtype=torch.long), scores)  # (n, V): 0 at the chosen token, -inf elsewhere
    assert out.isfinite().sum(-1).eq(1).all()
    return torch.bincount(out.argmax(-1), minlength=len(logits)).tolist()


def chi_square_p(counts: list[int], probs: list[float]) -> float:
    """Pearson χ² p-value of counts against probabilities (tokens of probability 0 must have count 0)."""
    n = sum(counts)
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0), (counts, probs)
    cells = [(c, n * p) for c, p in zip(counts, probs) if p > 0]
    statistic = sum((c - e) ** 2 / e for c, e in cells)
    dof = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def test_chi_square_helper_matches_table_values():
    # χ² critical values (5 and 2 degrees of freedom) from standard tables
    assert chi_square_p([1] * 6, [1 / 6] * 6) == pytest.approx(1.0)
    p = torch.special.gammaincc(torch.tensor(2.5, dtype=torch.float64), torch.tensor(20.515 / 2, dtype=torch.float64))
    assert float(p) == pytest.approx(0.001, rel=1e-3)
    p = torch.special.gammaincc(torch.tensor(1.0, dtype=torch.float64), torch.tensor(5.991 / 2, dtype=torch.float64))
    assert float(p) == pytest.approx(0.05, rel=1e-3)


def test_draws_follow_the_softmax():
    counts = draw(GenerationSettings())
    probs = softmax(LOGITS)
    assert chi_square_p(counts, probs) > 1e-3, (counts, [round(DRAWS * p) for p in probs])
    # and the test has power: the same draws are far from a distribution one step off
    assert chi_square_p(counts, probs[1:] + probs[:1]) < 1e-12


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    counts = draw(GenerationSettings(temperature=temperature), seed=1)
    want = softmax([v / temperature for v in LOGITS])
    assert chi_square_p(counts, want) > 1e-3, (counts, [round(DRAWS * p) for p in want])
    assert chi_square_p(counts, softmax(LOGITS)) < 1e-12  # not the untempered distribution


@pytest.mark.parametrize("top_p, kept", [(0.75, 3), (0.5, 2), (0.95, 4)])
def test_top_p_keeps_the_nucleus(top_p, kept):
    counts = draw(GenerationSettings(top_p=top_p), seed=2)
    want = nucleus(softmax(LOGITS), top_p)
    assert sum(p > 0 for p in want) == kept  # probabilities 0.433, 0.263, 0.159, 0.097, 0.035, 0.013
    assert chi_square_p(counts, want) > 1e-3, (counts, [round(DRAWS * p) for p in want])


def test_temperature_then_top_p():
    """Temperature first, then the nucleus of the tempered distribution (the protocol's order, as in HF)."""
    counts = draw(GenerationSettings(temperature=2.0, top_p=0.6), seed=3)
    want = nucleus(softmax([v / 2.0 for v in LOGITS]), 0.6)
    assert chi_square_p(counts, want) > 1e-3, (counts, [round(DRAWS * p) for p in want])


def test_padding_rows_and_masked_tokens_are_never_drawn():
    """-inf logits (banned n-grams, tokens outside the nucleus) and head rows beyond the vocabulary get no draws."""
    logits = [1.0, float("-inf"), 0.0, float("-inf"), 3.0, 9.0]  # the last one is a padding row of the head
    generators = [torch.Generator().manual_seed(row) for row in range(4000)]
    sampler = PerItemSampler(generators, 5, GenerationSettings())
    out = sampler(torch.zeros((4000, 1), dtype=torch.long), torch.tensor([logits]).expand(4000, -1))
    counts = torch.bincount(out.argmax(-1), minlength=6).tolist()
    assert counts[1] == counts[3] == counts[5] == 0
    assert chi_square_p(counts[:5], [p if math.isfinite(v) else 0.0 for p, v in
                                     zip(softmax([1.0, -1e9, 0.0, -1e9, 3.0]), logits)]) > 1e-3


# ---- through generate_batch: the settings reach the sampler and the n-gram rule -------------------------------

@pytest.fixture(scope="module")
def repetitive():
    """A tiny GPT-2 whose head strongly prefers four tokens and never ends (EOS pushed down): it repeats itself."""
    tokenizer = make_tokenizer()
    model = make_gpt2(tokenizer, seed=3)
    bias = torch.zeros(len(tokenizer))
    favourites = tokenizer.convert_tokens_to_ids(["P", "a", "r", "i"])
    bias[favourites] = 8.0
    bias[tokenizer.eos_token_id] = -50.0
    model.lm_head.bias = nn.Parameter(bias)
    prompts = [tokenizer("Name the capital of France.", add_special_tokens=False)["input_ids"],
               tokenizer("Water boils at one hundred degrees.", add_special_tokens=False)["input_ids"]]
    return tokenizer, model, prompts


def generated_ids(model, tokenizer, prompts, settings, seeds=(1, 2)) -> list[list[int]]:
    """Prompt + new token ids of each row (padding removed), as generate_batch produced them."""
    captured = {}
    original = model.generate

    def spy(*args, **kwargs):
        captured["sequences"] = original(*args, **kwargs)
        return captured["sequences"]

    model.generate = spy
    try:
        with one_thread():
            generate_batch(model, tokenizer, prompts, list(seeds), settings)
    finally:
        model.generate = original
    width = max(len(p) for p in prompts)
    return [list(p) + row[width:].tolist() for p, row in zip(prompts, captured["sequences"])]


def repeated_ngrams(ids: list[int], n: int) -> int:
    """How many n-grams of ids occur again later (counted by a plain scan)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


@pytest.mark.parametrize("size", [2, 3])
def test_no_repeat_ngram_rule_holds_over_prompt_and_response(repetitive, size):
    tokenizer, model, prompts = repetitive
    free = generated_ids(model, tokenizer, prompts, GenerationSettings(max_new_tokens=24, no_repeat_ngram_size=0))
    assert all(repeated_ngrams(row, size) > 3 for row in free)  # the premise: left alone, it repeats
    ruled = generated_ids(model, tokenizer, prompts, GenerationSettings(max_new_tokens=24, no_repeat_ngram_size=size))
    for row, prompt in zip(ruled, prompts):
        assert len(row) == len(prompt) + 24
        assert repeated_ngrams(row, size) == 0


@pytest.mark.parametrize("knob", ["temperature", "top_p"])
def test_settings_reach_the_sampler(repetitive, knob):
    """A vanishing temperature or nucleus leaves only the most probable token: generate_batch then equals greedy."""
    tokenizer, model, prompts = repetitive
    settings = GenerationSettings(max_new_tokens=12, no_repeat_ngram_size=3, **{knob: 1e-6})
    sampled = generated_ids(model, tokenizer, prompts, settings)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with one_thread():
        greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                no_repeat_ngram_size=3, pad_token_id=tokenizer.eos_token_id)
    assert sampled == [list(p) + row[width:].tolist() for p, row in zip(prompts, greedy)]
    # while at temperature 1 the same seeds do not give the greedy output
    plain = generated_ids(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12, no_repeat_ngram_size=3))
    assert plain != sampled
