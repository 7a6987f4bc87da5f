"""Structure-matrix distances (Appendix B) against naive loops; chunk pooling across different tokenizers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _eval_helpers import make_gpt2, make_llama, make_tokenizer

from dwakd.evaluation.similarity import (
    chunk_assignment,
    common_chunks,
    encode_text,
    final_hidden,
    measure_similarity,
    sentence_distances,
    structure_distances,
    write_similarity_report,
)


def _naive_distances(hs: list[list[float]], ht: list[list[float]]) -> tuple[float, float]:
    """Plain-Python version of the reference script's two distances."""
    def dot(u, v):
        return sum(a * b for a, b in zip(u, v))

    def matrices(h):
        n = len(h)
        cos = [[dot(h[i], h[j]) / math.sqrt(dot(h[i], h[i]) * dot(h[j], h[j])) for j in range(n)] for i in range(n)]
        prod = []
        for i in range(n):
            row = [dot(h[i], h[j]) for j in range(n)]
            total = sum(row)
            prod.append([x / total for x in row])
        return cos, prod

    (sc, sp), (tc, tp) = matrices(hs), matrices(ht)
    n = len(hs)
    d_cos = sum(abs(sc[i][j] - tc[i][j]) for i in range(n) for j in range(n)) / (n * n)
    d_prod = sum(sum(abs(sp[i][j] - tp[i][j]) for j in range(n)) for i in range(n)) / n
    return d_cos, d_prod


def test_structure_distances_match_naive_loops():
    gen = torch.Generator().manual_seed(0)
    for n, ds, dt in [(2, 3, 5), (7, 16, 24), (12, 8, 8)]:
        hs = torch.randn(n, ds, generator=gen, dtype=torch.float64) + 0.5  # offset: row sums stay away from 0
        ht = torch.randn(n, dt, generator=gen, dtype=torch.float64) + 0.5
        got = structure_distances(hs, ht)
        want = _naive_distances(hs.tolist(), ht.tolist())
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    same = torch.randn(5, 4, generator=gen) + 0.5
    assert structure_distances(same, same * 3.0) == pytest.approx((0.0, 0.0), abs=1e-6)  # scale-invariant
    with pytest.raises(ValueError):
        structure_distances(torch.ones(3, 2), torch.ones(4, 2))


def test_common_chunks_and_assignment():
    # text "ab cd" after a 3-char prompt: A splits "ab| cd", B splits "a|b| c|d"
    start = 3
    a = [(0, 3), (3, 5), (5, 8)]
    b = [(0, 2), (2, 3), (3, 4), (4, 5), (5, 7), (7, 8)]
    ends = common_chunks(a, b, start)
    assert ends == [5, 8]
    assert chunk_assignment(a, ends, start) == [-1, 0, 1]
    assert chunk_assignment(b, ends, start) == [-1, -1, 0, 0, 1, 1]


@pytest.fixture(scope="module")
def pair():
    tok_s, tok_t = make_tokenizer(300), make_tokenizer(420)
    return (make_gpt2(tok_s, seed=3), tok_s), (make_llama(tok_t, seed=4), tok_t)


PROMPT = "### Instruction:\nName a capital.\n\n### Response:\n"
RESPONSE = "Paris is the capital of France, and Rome is the capital of Italy."


def test_cross_tokenizer_distances_match_naive_pooling(pair):
    student, teacher = pair
    s_enc, t_enc = encode_text(student[1], PROMPT, RESPONSE), encode_text(teacher[1], PROMPT, RESPONSE)
    assert s_enc.input_ids != t_enc.input_ids  # really different tokenizations
    # Naive: walk the response characters; a chunk closes where both sides end a token.
    start = len(PROMPT)
    s_ends = {e for s, e in s_enc.offsets if s >= start}
    t_ends = {e for s, e in t_enc.offsets if s >= start}
    hs, ht = final_hidden(student[0], s_enc.input_ids), final_hidden(teacher[0], t_enc.input_ids)
    pooled_s, pooled_t, lo = [], [], start
    for pos in range(start + 1, start + len(RESPONSE) + 1):
        if pos in s_ends and pos in t_ends:
            rows_s = [hs[k] for k, (s, e) in enumerate(s_enc.offsets) if lo <= s < pos]
            rows_t = [ht[k] for k, (s, e) in enumerate(t_enc.offsets) if lo <= s < pos]
            pooled_s.append(torch.stack(rows_s).mean(0))
            pooled_t.append(torch.stack(rows_t).mean(0))
            lo = pos
    want = _naive_distances(torch.stack(pooled_s).double().tolist(), torch.stack(pooled_t).double().tolist())
    d_cos, d_prod, n = sentence_distances(student, teacher, PROMPT, RESPONSE)
    assert n == len(pooled_s) and 2 <= n < len([o for o in s_enc.offsets if o[0] >= start])
    assert (d_cos, d_prod) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_same_tokenizer_is_token_level(pair):
    student, _ = pair
    other = (make_gpt2(student[1], seed=9), student[1])
    enc = encode_text(student[1], PROMPT, RESPONSE)
    start = sum(1 for s, _ in enc.offsets if s < len(PROMPT))
    hs = final_hidden(student[0], enc.input_ids)[start:]
    ho = final_hidden(other[0], enc.input_ids)[start:]
    d_cos, d_prod, n = sentence_distances(student, other, PROMPT, RESPONSE)
    assert n == hs.shape[0]
    assert (d_cos, d_prod) == pytest.approx(_naive_distances(hs.double().tolist(), ho.double().tolist()), rel=1e-4)
    assert sentence_distances(student, student, PROMPT, RESPONSE)[:2] == pytest.approx((0.0, 0.0), abs=1e-6)


def test_report_files(pair, tmp_path):
    student, teacher = pair
    texts = [(PROMPT, RESPONSE), (PROMPT, "Water boils at one hundred degrees."), (PROMPT, "A")]
    results = measure_similarity(teacher, {"a": student, "b": (make_gpt2(student[1], seed=5), student[1])},
                                 texts, progress=False)
    assert len(results["a"].cosine) == 2 and results["a"].skipped == 1  # "A" is a single chunk
    paths = write_similarity_report(results, tmp_path, {"teacher": "t"})
    data = json.loads(paths["json"].read_text())
    assert data["methods"]["a"]["cosine"] == results["a"].cosine
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "| a |" in paths["markdown"].read_text()


def test_similarity_command(pair, tmp_path, capsys):
    from _eval_helpers import save_checkpoint, write_jsonl

    from dwakd.cli import main

    student, teacher = pair
    t_dir = save_checkpoint(teacher[0], teacher[1], tmp_path / "teacher")
    s_dir = save_checkpoint(student[0], student[1], tmp_path / "student")
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"instruction": "Name a capital.", "output": RESPONSE},
        {"instruction": "Boiling point?", "output": "Water boils at 100 degrees."},
        {"instruction": "Unused", "output": "Never read."},
    ])
    code = main(["similarity", "--teacher", t_dir, "--student", f"sft={s_dir}", "--data", f"{data}:2",
                 "--out-dir", str(tmp_path / "sim"), "--device", "cpu", "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "sim" / "similarity.json").read_text())["methods"]["sft"]
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nName a capital.\n\n### Response:\n")
    d_cos, d_prod, _ = sentence_distances(student, teacher, prompt[:256], RESPONSE[:256])
    assert len(result["cosine"]) == 2
    assert result["cosine"][0] == pytest.approx(d_cos, rel=1e-5)
    assert result["inner_product"][0] == pytest.approx(d_prod, rel=1e-5)
    assert "| sft | 2 |" in capsys.readouterr().out
