"""Representation similarity between teacher and student (paper Appendix B, following DSKD's analysis script).

For one sentence, each model's final hidden states h (n, d) over the response give two n x n structure
matrices: cosine, M_cos[i, j] = cos(h_i, h_j), and normalised inner product, M_prod[i, j] = <h_i, h_j> /
sum_k <h_i, h_k> (row-normalised, as in songmzhang/DSKD `code/analysis/cal_structure_dist.py`). Distances, also
as in that script: cosine  d_cos = mean_{i,j} |M_cos^s - M_cos^t|; inner product  d_prod = mean_i sum_j
|M_prod^s - M_prod^t| (the L1 distance of each row, averaged over rows). Lower = closer to the teacher.

Cross-tokenizer choice (not specified by the paper): teacher and student split the same text into different
tokens, so the matrices would have different sizes. We compare them on common chunks: character spans that
end where *both* tokenizations have a token boundary; each model's hidden states are mean-pooled over its
tokens inside each chunk. With identical tokenizations every chunk is one token and this is exactly the
token-level computation of the reference script.

Text: as in the reference script, the prompt's first 256 characters and the response's first 256 characters;
each is tokenized separately without special tokens (as in training) and only response positions are
compared.
"""

from __future__ import annotations

import bisect
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dwakd.data.records import InstructionRecord


def structure_matrices(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, row-normalised inner product) structure matrices, each (n, n), of hidden states (n, d)."""
    hidden = hidden.float()
    unit = F.normalize(hidden, dim=-1)
    cosine = unit @ unit.T
    inner = hidden @ hidden.T
    return cosine, inner / inner.sum(-1, keepdim=True)


def structure_distances(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> tuple[float, float]:
    """(d_cos, d_prod) between the structure matrices of student (n, d_s) and teacher (n, d_t) hidden states."""
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"need the same number of positions, got {student_hidden.shape[0]} and {teacher_hidden.shape[0]}")
    s_cos, s_prod = structure_matrices(student_hidden)
    t_cos, t_prod = structure_matrices(teacher_hidden)
    return float((s_cos - t_cos).abs().mean()), float((s_prod - t_prod).abs().sum(-1).mean())


def common_chunks(offsets_a: Sequence[tuple[int, int]], offsets_b: Sequence[tuple[int, int]], start: int) -> list[int]:
    """Sorted chunk end positions: character offsets > `start` where both tokenizations end a token."""
    ends_a = {e for s, e in offsets_a if e > s and s >= start}
    ends_b = {e for s, e in offsets_b if e > s and s >= start}
    return sorted(ends_a & ends_b)


def chunk_assignment(offsets: Sequence[tuple[int, int]], ends: Sequence[int], start: int) -> list[int]:
    """Chunk index of each token (by its start offset), or -1 for tokens outside [start, ends[-1]) or empty."""
    out = []
    for s, e in offsets:
        if e <= s or s < start or not ends or s >= ends[-1]:
            out.append(-1)
        else:
            out.append(bisect.bisect_right(ends, s))
    return out


def pool_chunks(hidden: torch.Tensor, assignment: Sequence[int], n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of hidden (n, d) per chunk -> (n_chunks, d), and a bool (n_chunks,) of chunks that got a token."""
    index = torch.tensor(assignment, dtype=torch.long, device=hidden.device)
    keep = index >= 0
    sums = torch.zeros(n_chunks, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    counts = torch.zeros(n_chunks, dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, index[keep], hidden[keep].float())
    counts.index_add_(0, index[keep], torch.ones(int(keep.sum()), device=hidden.device))
    return sums / counts.clamp_min(1).unsqueeze(-1), counts > 0


@dataclass
class EncodedText:
    """One model's view of a sentence: token ids and character offsets into prompt + response."""

    input_ids: list[int]
    offsets: list[tuple[int, int]]
    response_start: int  # character offset where the response begins


def encode_text(tokenizer: Any, prompt: str, response: str) -> EncodedText:
    """Tokenize prompt and response separately (no special tokens) with offsets into their concatenation."""
    p = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    r = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    shift = len(prompt)
    offsets = [tuple(o) for o in p["offset_mapping"]] + [(s + shift, e + shift) for s, e in r["offset_mapping"]]
    return EncodedText(list(p["input_ids"]) + list(r["input_ids"]), offsets, shift)


@torch.no_grad()
def final_hidden(model: Any, input_ids: Sequence[int]) -> torch.Tensor:
    """(n, d) final-layer hidden states (after the final norm) of one unpadded sequence."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    return model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float()


def sentence_distances(student: tuple[Any, Any], teacher: tuple[Any, Any], prompt: str,
                       response: str) -> tuple[float, float, int]:
    """(d_cos, d_prod, number of compared chunks) for one prompt/response pair."""
    (s_model, s_tok), (t_model, t_tok) = student, teacher
    s_enc, t_enc = encode_text(s_tok, prompt, response), encode_text(t_tok, prompt, response)
    start = len(prompt)
    ends = common_chunks(s_enc.offsets, t_enc.offsets, start)
    s_assign = chunk_assignment(s_enc.offsets, ends, start)
    t_assign = chunk_assignment(t_enc.offsets, ends, start)
    s_pooled, s_has = pool_chunks(final_hidden(s_model, s_enc.input_ids), s_assign, len(ends))
    t_pooled, t_has = pool_chunks(final_hidden(t_model, t_enc.input_ids), t_assign, len(ends))
    both = s_has & t_has
    if int(both.sum()) < 2:
        raise ValueError("fewer than 2 common chunks in the response; the sentence is too short to compare")
    d_cos, d_prod = structure_distances(s_pooled[both], t_pooled[both])
    return d_cos, d_prod, int(both.sum())


@dataclass
class SimilarityResult:
    """Per-sentence distances of one student to the teacher."""

    cosine: list[float] = field(default_factory=list)
    inner_product: list[float] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    skipped: int = 0

    def summary(self) -> dict[str, Any]:
        """Median, quartiles and mean of both distances."""
        def stats(values: list[float]) -> dict[str, float]:
            q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
            return {"median": statistics.median(values), "q1": q1, "q3": q3, "mean": statistics.fmean(values)}
        return {"n": len(self.cosine), "skipped": self.skipped, "cosine": stats(self.cosine),
                "inner_product": stats(self.inner_product)}


def texts_from_records(records: Sequence[InstructionRecord], max_chars: int = 256) -> list[tuple[str, str]]:
    """(prompt[:max_chars], response[:max_chars]) pairs, as the reference script cuts them."""
    return [(r.prompt[:max_chars], r.response[:max_chars]) for r in records]


def measure_similarity(
    teacher: tuple[Any, Any],
    students: Mapping[str, tuple[Any, Any]],
    texts: Sequence[tuple[str, str]],
    progress: bool = True,
) -> dict[str, SimilarityResult]:
    """Distances of every student to the teacher over all (prompt, response) texts; too-short texts are skipped."""
    from tqdm.auto import tqdm

    results: dict[str, SimilarityResult] = {}
    for name, student in students.items():
        result = SimilarityResult()
        for prompt, response in tqdm(texts, desc=f"similarity {name}", disable=not progress, unit="text"):
            try:
                d_cos, d_prod, n = sentence_distances(student, teacher, prompt, response)
            except ValueError:
                result.skipped += 1
                continue
            result.cosine.append(d_cos)
            result.inner_product.append(d_prod)
            result.chunks.append(n)
        if not result.cosine:
            raise ValueError(f"{name}: no text had two or more common chunks to compare")
        results[name] = result
    return results


def plot_similarity(results: Mapping[str, SimilarityResult], path: str | Path, title: str | None = None) -> Path:
    """Box plots (no fliers, like the reference) of both distances, one box per method, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(names) + 3), 4.0))
    for ax, key, label in ((axes[0], "cosine", "Cosine"), (axes[1], "inner_product", "Inner product")):
        ax.boxplot([getattr(results[n], key) for n in names], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names)
        ax.set_xlabel("Methods")
        ax.set_ylabel(f"Representation distance ({label})")
        ax.grid(axis="y", linestyle=":")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_similarity_report(results: Mapping[str, SimilarityResult], out_dir: str | Path,
                            meta: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """similarity.json (all distances + summaries), similarity.md (medians) and similarity.png (box plots)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {**(meta or {}), "methods": {n: {"summary": r.summary(), "cosine": r.cosine,
                                             "inner_product": r.inner_product, "chunks": r.chunks}
                                         for n, r in results.items()}}
    paths = {"json": out_dir / "similarity.json", "markdown": out_dir / "similarity.md"}
    paths["json"].write_text(json.dumps(data, indent=2), encoding="utf-8")
    lines = ["| Method | n | Cosine median [q1, q3] | Inner-product median [q1, q3] |", "|---|---:|---:|---:|"]
    for name, result in results.items():
        s = result.summary()
        c, p = s["cosine"], s["inner_product"]
        lines.append(f"| {name} | {s['n']} | {c['median']:.4f} [{c['q1']:.4f}, {c['q3']:.4f}] | "
                     f"{p['median']:.4f} [{p['q1']:.4f}, {p['q3']:.4f}] |")
    paths["markdown"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["png"] = plot_similarity(results, out_dir / "similarity.png")
    return paths
