"""Naive references and fixtures for the representation-level methods (SRA, MTA) and their modules.

Everything here is written for the tests and shares no code with `dwakd.modules`: loops over sequences, tokens,
spans and pairs, float64 arithmetic, textbook formulas.
"""

from __future__ import annotations

import math

import torch

from dwakd.methods.base import DistillationInputs, ModelView, TokenView
from dwakd.models import build_tiny_model

# ------------------------------------------------------------------------------------------------ spans and units


def response_positions(view: TokenView, b: int) -> list[int]:
    """Input positions of sequence b that hold a response token: every valid label position but the first."""
    valid = [i for i in range(view.labels.shape[1]) if int(view.labels[b, i]) != -100]
    return valid[1:]


def naive_spans(student: TokenView, teacher: TokenView, b: int) -> tuple[dict[int, int], dict[int, int], int]:
    """(student position → span, teacher position → span, span count) of sequence b, by loops.

    A side ends a token at offset e when a token ends there and the next response token starts at or after e; spans
    close at the offsets where both sides end a token; a token belongs to the first span whose end is ≥ its end.
    """
    def ends(view: TokenView) -> set[int]:
        pos = response_positions(view, b)
        out = set()
        for k, i in enumerate(pos):
            e = int(view.input_offsets[b, i, 1])
            if k + 1 == len(pos) or int(view.input_offsets[b, pos[k + 1], 0]) >= e:
                out.add(e)
        return out

    common = sorted(ends(student) & ends(teacher))

    def assign(view: TokenView) -> dict[int, int]:
        out = {}
        for i in response_positions(view, b):
            e = int(view.input_offsets[b, i, 1])
            for k, c in enumerate(common):
                if e <= c:
                    out[i] = k
                    break
        return out

    return assign(student), assign(teacher), len(common)


def naive_centre(hidden: torch.Tensor, weights: list[float], members: list[int]) -> tuple[torch.Tensor, float]:
    """Σ w_t h_t / Σ w_t over `members` (float64 vectors of a (length, d) tensor) and the mass Σ w_t."""
    mass = sum(weights[t] for t in members)
    total = sum(weights[t] * hidden[t].double() for t in members)
    return total / mass, mass


def naive_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b) / (torch.sqrt(a @ a) * torch.sqrt(b @ b))


def naive_structure(a: list[torch.Tensor], b: list[torch.Tensor], m: list[float]) -> torch.Tensor:
    """Σ_{k≠j} m_k m_j (cos(a_k, a_j) − cos(b_k, b_j))² / Σ_{k≠j} m_k m_j (0 with fewer than two units)."""
    num, den = torch.zeros((), dtype=torch.float64), 0.0
    for k in range(len(a)):
        for j in range(len(a)):
            if k != j:
                num = num + m[k] * m[j] * (naive_cos(a[k], a[j]) - naive_cos(b[k], b[j])) ** 2
                den += m[k] * m[j]
    return num / den if den > 0 else num


def naive_weighted_distance(a: list[torch.Tensor], b: list[torch.Tensor], m: list[float]) -> torch.Tensor:
    """Σ_k m_k (1 − cos(a_k, b_k)) / Σ_k m_k."""
    total = sum(m)
    out = torch.zeros((), dtype=torch.float64)
    for ak, bk, mk in zip(a, b, m):
        out = out + mk * (1 - naive_cos(ak, bk))
    return out / total if total > 0 else out


# ------------------------------------------------------------------------------------------------ token weights


def naive_last_token_attention(attention: torch.Tensor, mask: torch.Tensor, b: int) -> list[float]:
    """Heads summed, row of the last non-padding position, normalised to sum 1 (one layer, sequence b)."""
    length = mask.shape[1]
    last = max(i for i in range(length) if int(mask[b, i]) == 1)
    attention = attention.detach()
    row = [sum(float(attention[b, h, last, j]) for h in range(attention.shape[1])) * int(mask[b, j])
           for j in range(length)]
    total = sum(row)
    return [r / total for r in row]


def naive_self_similarity(hidden: torch.Tensor, mask: torch.Tensor, b: int) -> list[float]:
    """MTA weights: x̂ = h/(std(h)+1e-5) per token, softmax over other valid j of x̂_i·x̂_j/√d, mean over valid i."""
    length, d = hidden.shape[1], hidden.shape[2]
    valid = [i for i in range(length) if int(mask[b, i]) == 1]
    x = {}
    for i in valid:
        h = [float(v) for v in hidden[b, i]]
        mean = sum(h) / d
        std = math.sqrt(sum((v - mean) ** 2 for v in h) / (d - 1))
        x[i] = [v / (std + 1e-5) for v in h]
    w = [0.0] * length
    for i in valid:
        others = [j for j in valid if j != i]
        if not others:
            continue
        scores = {j: sum(p * q for p, q in zip(x[i], x[j])) / math.sqrt(d) for j in others}
        top = max(scores.values())
        z = sum(math.exp(s - top) for s in scores.values())
        for j in others:
            w[j] += math.exp(scores[j] - top) / z
    return [v / len(valid) for v in w]


# ------------------------------------------------------------------------------------------------ models


def deep_model(arch: str, vocab: int, seed: int, hidden: int, layers: int, heads: int = 2) -> torch.nn.Module:
    """A random-init causal LM with `layers` blocks and 3 head padding rows, float64, eval mode, eager attention."""
    model = build_tiny_model(arch, vocab + 3, seed=seed, hidden_size=hidden, num_layers=layers, num_heads=heads,
                             intermediate_size=2 * hidden, max_positions=128, bos_token_id=None, eos_token_id=None)
    model.set_attn_implementation("eager")
    return model.double().eval()


def run_both(student, teacher, s_view: TokenView, t_view: TokenView, s_vocab: int, t_vocab: int,
             num_items=None) -> DistillationInputs:
    """Forward both models with hidden states and attentions (teacher without grad), like the trainer."""
    s = student(input_ids=s_view.input_ids, attention_mask=s_view.attention_mask, output_hidden_states=True,
                output_attentions=True)
    with torch.no_grad():
        t = teacher(input_ids=t_view.input_ids, attention_mask=t_view.attention_mask, output_hidden_states=True,
                    output_attentions=True)
    n = s_view.label_mask.sum() if num_items is None else torch.as_tensor(num_items)
    return DistillationInputs(s_view, t_view,
                              ModelView(s.logits, s.hidden_states, student, s_vocab, attentions=s.attentions),
                              ModelView(t.logits, t.hidden_states, teacher, t_vocab, attentions=t.attentions), n)


class ModelPair:
    """Two real small tokenizers (byte-level BPE teacher, Metaspace BPE student) with views of `examples`, a GPT-2
    student with 2 layers (d 16) and a frozen Qwen2 teacher with 3 layers (d 24): unequal depths and widths."""

    def __init__(self, examples, extra_pad: int = 0):
        from _baseline_helpers import encode, pad_view, student_tokenizer, teacher_tokenizer

        self.s_tok, self.t_tok = student_tokenizer(), teacher_tokenizer()
        self.s_view = encode(self.s_tok, examples)
        self.t_view = encode(self.t_tok, examples)
        if extra_pad:
            self.s_view = pad_view(self.s_view, extra_pad, self.s_tok.pad_token_id)
            self.t_view = pad_view(self.t_view, extra_pad + 2, self.t_tok.pad_token_id)
        self.student = deep_model("gpt2", len(self.s_tok), seed=0, hidden=16, layers=2)
        self.teacher = deep_model("qwen2", len(self.t_tok), seed=1, hidden=24, layers=3)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def context(self):
        from dwakd.methods import MethodContext

        return MethodContext(self.student.config, self.teacher.config, self.s_tok, self.t_tok, self.student,
                             self.teacher)

    def inputs(self, num_items=None) -> DistillationInputs:
        return run_both(self.student, self.teacher, self.s_view, self.t_view, len(self.s_tok), len(self.t_tok),
                        num_items)


def trainable(method, model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable parameter of the method ("method.") and the student ("student.")."""
    named = [(f"method.{k}", p) for k, p in method.named_parameters()]
    named += [(f"student.{k}", p) for k, p in model.named_parameters()]
    return [(k, p) for k, p in named if p.requires_grad]
