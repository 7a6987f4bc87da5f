"""MinED — minimum-edit-distance token and vocabulary alignment (FuseLLM, Wan et al. 2024), docs/methods.md#63-mined.

1. Sequence alignment: per sequence, DTW over the response tokens of both sides with the edit distance
   between their token strings (spaces — the "Ġ"/"▁" markers — removed) as cost (`dwakd.alignment.dtw`).
2. Vocabulary map: every teacher token → the student token at minimum edit distance, built once from the two
   tokenizers and cached on disk (`dwakd.alignment.vocab_map`). Each student token that some teacher token
   maps onto reads that teacher token's logit (the closest one, then the lowest id); the others get −1e5.
3. At student positions matched to exactly one teacher position whose token maps onto the student's token,
   the mapped teacher logits are distilled with D (`kd_objective`, forward KL by default) at temperature τ;
   at every other response position the target is the gold token (one-hot), i.e. −log q_τ(y).
loss = (1 − kd_rate)·CE + kd_rate·(Σ D + Σ −log q_τ(y)) / num_items.

Choices and differences from the reference code (DSKD's `min_edit_dis_kld.py`):
- Token strings, not character offsets, drive the alignment: the edit-distance DTW *is* the method. They are
  the decoded bytes of each id (`dwakd.alignment.token_strings`), precomputed per tokenizer, so byte-level
  and SentencePiece markers compare correctly and nothing is decoded at training time.
- The aligned tokens are the *label* tokens (what each position predicts), so a matched pair predicts the
  same next token from the same text prefix; the reference aligns the input tokens at those positions, which
  are the previous tokens.
- "Mapped tokens agree" is the reference's test: map(teacher token) == student token.
- The reference builds the one-hot target as logits (100 / −1e5) and runs its KL on it; −log q_τ(y) is the
  same value without materialising the one-hot rows. With a divergence other than forward KL the one-hot
  positions still use −log q_τ(y) (reverse KL, JS, ... to a one-hot target are infinite or degenerate).
- Sums are divided by the global student token count (docs/methods.md §2.1); head padding rows are sliced off.
- `head_fusion` (as in dskd): with `fused` (`auto` on a GPU) no (rows × V) logits are formed. The student CE, the
  one-hot terms and the KD term are `fused_head_kd` calls on the student's hidden states and head; the KD target
  is the teacher's hidden state at the aligned row against a mapped teacher head, the (V_s, d_t) matrix whose
  row v is the teacher head's row for the teacher token v reads (zero, with a −1e5 bias, where none): its
  logits are exactly `mapped_teacher_logits`. A view without a plain linear head keeps the dense path.
Per-step cost: one rapidfuzz edit-distance matrix and one compiled DTW per sequence on CPU, outside autograd:
≈0.5 ms for a 256 × 256 response pair, ≈1 ms for a batch of 4 Dolly examples (benchmarks/vocab_map.py).
The vocabulary map is built once per tokenizer pair (Qwen × GPT-2: 33–44 s on a busy 2-core CPU) and then
loads from the cache in ≈0.02 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dwakd.alignment.dtw import dtw_path, edit_distance_matrix, single_matches
from dwakd.alignment.token_strings import token_table
from dwakd.alignment.vocab_map import cached_vocab_map
from dwakd.interface import label_rows
from dwakd.methods.base import (
    DistillationInputs,
    DistillationMethod,
    LossOutput,
    MethodContext,
    MethodOptions,
    ModelView,
    TokenView,
    check_choice,
)
from dwakd.methods.registry import register_method
from dwakd.modules.cross_entropy import label_cross_entropy_sum
from dwakd.modules.divergences import divergence, resolve_divergence
from dwakd.modules.head_fusion import HEAD_FUSIONS, use_fused_heads
from dwakd.ops.fused_kd import fused_head_kd

UNMAPPED_LOGIT = -1e5  # logit of student tokens no teacher token maps onto (the reference's constant)


@dataclass
class MinEDOptions(MethodOptions):
    """MinED knobs: the divergence at aligned positions and the threads used to build the vocabulary map."""

    kd_objective: str = "fkl"  # a docs/methods.md §3 name (as in dskd / dskdv2); the reference uses forward KL
    map_workers: int = -1  # threads for the one-off vocabulary-map build (−1: all cores)
    # fused: LM head + divergence in one op, no (rows × V) logits | dense: F.linear logits
    # | auto: fused on a GPU or under bf16 autocast, else dense
    head_fusion: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)


@dataclass
class MinEDAlignment:
    """Flat row indices into the (batch·length) grids: aligned student/teacher rows and one-hot student rows."""

    student_rows: torch.Tensor  # (aligned,) int64
    teacher_rows: torch.Tensor  # (aligned,) int64
    one_hot_rows: torch.Tensor  # (rest,) int64, student response positions without a usable teacher match


@register_method
class MinED(DistillationMethod):
    """Distil mapped teacher logits at DTW-aligned positions whose mapped tokens agree; gold one-hot elsewhere."""

    name = "mined"
    title = "MinED"
    Options = MinEDOptions

    def __init__(self, options: MinEDOptions, context: MethodContext):
        super().__init__(options, context)
        if context.teacher_tokenizer is None:
            raise ValueError("mined needs the teacher's tokenizer (MethodContext.teacher_tokenizer)")
        self.kd_objective = resolve_divergence(options.kd_objective)  # short name (DSKD's long names accepted)
        student_table = token_table(context.student_tokenizer)
        teacher_table = token_table(context.teacher_tokenizer)
        vmap = cached_vocab_map(teacher_table, student_table, context.cache_dir, workers=options.map_workers)
        self.teacher_to_student = vmap.teacher_to_student  # (V_t,) numpy, used on CPU by the alignment
        student_to_teacher = vmap.student_to_teacher()  # (V_s,)
        mapped = np.nonzero(student_to_teacher >= 0)[0]
        # student ids that read a teacher logit, and the teacher id they read (non-persistent: rebuilt from tokenizers)
        self.register_buffer("mapped_student_ids", torch.from_numpy(mapped), persistent=False)
        self.register_buffer("mapped_teacher_ids", torch.from_numpy(student_to_teacher[mapped]), persistent=False)
        self.student_strings = student_table.stripped_strings()
        self.teacher_strings = teacher_table.stripped_strings()
        self.map_stats = vmap.stats

    def align(self, student: TokenView, teacher: TokenView) -> MinEDAlignment:
        """Edit-distance DTW per sequence over the label tokens; keep one-to-one matches whose mapped tokens agree."""
        s_labels, t_labels = student.labels.cpu().numpy(), teacher.labels.cpu().numpy()
        n, m = s_labels.shape[1], t_labels.shape[1]
        s_rows, t_rows, rest = [], [], []
        for b in range(s_labels.shape[0]):
            s_pos = np.nonzero(s_labels[b] != -100)[0]
            t_pos = np.nonzero(t_labels[b] != -100)[0]
            if len(s_pos) == 0:
                continue
            if len(t_pos) == 0:
                rest.append(b * n + s_pos)
                continue
            s_ids, t_ids = s_labels[b, s_pos], t_labels[b, t_pos]
            cost = edit_distance_matrix([self._string(self.teacher_strings, i) for i in t_ids],
                                        [self._string(self.student_strings, i) for i in s_ids])  # (m_b, n_b)
            partner = single_matches(dtw_path(cost), len(s_pos), axis=1)  # teacher index per student token, −1
            ok = partner >= 0
            mapped = np.full(len(s_pos), -2, dtype=np.int64)
            t_match = t_ids[partner[ok]]
            in_map = t_match < len(self.teacher_to_student)
            mapped[np.nonzero(ok)[0][in_map]] = self.teacher_to_student[t_match[in_map]]
            ok &= mapped == s_ids
            s_rows.append(b * n + s_pos[ok])
            t_rows.append(b * m + t_pos[partner[ok]])
            rest.append(b * n + s_pos[~ok])
        device = student.labels.device

        def cat(parts: list[np.ndarray]) -> torch.Tensor:
            flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            return torch.as_tensor(flat, dtype=torch.long, device=device)

        return MinEDAlignment(cat(s_rows), cat(t_rows), cat(rest))

    @staticmethod
    def _string(strings: list[str], token_id: int) -> str:
        return strings[token_id] if 0 <= token_id < len(strings) else ""

    def mapped_teacher_logits(
        self, teacher_logits: torch.Tensor, rows: torch.Tensor | None, student_vocab: int
    ) -> torch.Tensor:
        """(rows, V_s) fp32 teacher logits in the student vocabulary: mapped columns copied, the rest −1e5.

        `rows` picks flat positions of `teacher_logits`; None takes every row (logits already gathered).
        """
        picked = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])  # (k, R_t)
        picked = picked if rows is None else picked[rows]
        dtype = torch.promote_types(picked.dtype, torch.float32)
        out = torch.full((picked.shape[0], student_vocab), UNMAPPED_LOGIT, dtype=dtype, device=picked.device)
        keep = self.mapped_student_ids < student_vocab
        out[:, self.mapped_student_ids[keep]] = picked[:, self.mapped_teacher_ids[keep]].to(dtype)
        return out

    def mapped_teacher_head(self, teacher_head: torch.Tensor, student_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_s, d_t) head and (V_s,) bias whose logits on a teacher hidden state are `mapped_teacher_logits`':
        row v is the teacher head's row of the teacher token student token v reads (bias 0), zero with bias
        −1e5 where none. Detached: the teacher gets no gradient."""
        keep = self.mapped_student_ids < student_vocab
        student_ids, teacher_ids = self.mapped_student_ids[keep], self.mapped_teacher_ids[keep]
        head = teacher_head.detach().new_zeros(student_vocab, teacher_head.shape[1])
        head[student_ids] = teacher_head.detach()[teacher_ids]
        dtype = torch.promote_types(teacher_head.dtype, torch.float32)
        bias = torch.full((student_vocab,), UNMAPPED_LOGIT, dtype=dtype, device=teacher_head.device)
        bias[student_ids] = 0.0
        return head, bias

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        alignment = self.align(inputs.student, inputs.teacher)
        heads = self._fused_heads(inputs.student_out, inputs.teacher_out, inputs.student.labels.device)
        if heads is not None:
            ce_sum, kd_sum = self._fused_sums(inputs, alignment, *heads)
        else:
            ce_sum, kd_sum = self._dense_sums(inputs, alignment)
        ce, kd = ce_sum / inputs.num_items, kd_sum / inputs.num_items
        rate = self.options.kd_rate
        loss = (1.0 - rate) * ce + rate * kd
        valid = max(1, int(inputs.student.label_mask.sum()))
        return LossOutput(loss, {"ce": ce.detach(), "kd": kd.detach()},
                          {"aligned_fraction": alignment.student_rows.numel() / valid})

    def _fused_heads(self, s_out: ModelView, t_out: ModelView,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The student and teacher head weights when both views allow the fused op and it is asked for."""
        if not use_fused_heads(self.options.head_fusion, device):
            return None
        student_w, teacher_w = s_out.linear_head_weight(), t_out.linear_head_weight()
        return None if student_w is None or teacher_w is None else (student_w, teacher_w)

    def _dense_sums(self, inputs: DistillationInputs, alignment: MinEDAlignment) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ CE and Σ KD (aligned D + one-hot −log q_τ) from dense logits at the student's label rows."""
        s_out, t_out = inputs.student_out, inputs.teacher_out
        tau = self.options.kd_temperature
        vocab = s_out.vocab_size
        s_logits, s_index = s_out.label_logits(inputs.student)  # (K, R_s): the head runs at label rows only
        ce_sum = label_cross_entropy_sum(s_logits, inputs.student, vocab)
        student_logits = s_logits[:, :vocab]  # (K, V_s) without the head's padding rows
        kd_sum = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
        if alignment.student_rows.numel():
            t_logits = t_out.logits_at(alignment.teacher_rows)  # (k, R_t) aligned teacher rows only
            target = self.mapped_teacher_logits(t_logits, None, vocab)  # (k, V_s)
            kd_sum = kd_sum + divergence(student_logits, target, self.kd_objective, tau,
                                         student_rows=s_index.index_select(0, alignment.student_rows)).sum()
        if alignment.one_hot_rows.numel():
            picked = student_logits.index_select(0, s_index.index_select(0, alignment.one_hot_rows))  # (rest, V_s)
            gold = inputs.student.labels.reshape(-1).index_select(0, alignment.one_hot_rows)
            kd_sum = kd_sum + F.cross_entropy(picked.to(kd_sum.dtype) / tau, gold, reduction="sum")
        return ce_sum, kd_sum

    def _fused_sums(self, inputs: DistillationInputs, alignment: MinEDAlignment, student_w: torch.Tensor,
                    teacher_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_dense_sums` through `fused_head_kd`: the student CE over the label rows, the one-hot terms (reusing
        those CEs when τ = 1), and D(mapped teacher → student) at the aligned rows."""
        s_out, t_out, student = inputs.student_out, inputs.teacher_out, inputs.student
        tau, vocab = self.options.kd_temperature, s_out.vocab_size
        labels = student.labels.reshape(-1)
        rows, row_of = label_rows(student)  # (K,) flat positions; flat position -> row of them
        ce_rows = fused_head_kd(s_out.hidden_at(rows), student_w, vocab_size=vocab, divergence=None,
                                pred_labels=labels.index_select(0, rows)).pred_ce  # (K,)
        ce_sum = ce_rows.sum()
        kd_sum = ce_sum.new_zeros(())
        if alignment.student_rows.numel():
            head, bias = self.mapped_teacher_head(teacher_w, vocab)
            kd_rows = fused_head_kd(
                s_out.hidden_at(alignment.student_rows), student_w, t_out.hidden_at(alignment.teacher_rows).detach(),
                head, vocab_size=vocab, divergence=self.kd_objective, temperature=tau, target_bias=bias,
            ).divergence
            kd_sum = kd_sum + kd_rows.sum()
        rest = alignment.one_hot_rows
        if rest.numel():
            if tau == 1.0:  # −log q_1(gold) is the CE already formed at those rows
                kd_sum = kd_sum + ce_rows.index_select(0, row_of.index_select(0, rest)).sum()
            else:
                kd_sum = kd_sum + fused_head_kd(s_out.hidden_at(rest), student_w, vocab_size=vocab, divergence=None,
                                                pred_labels=labels.index_select(0, rest),
                                                ce_temperature=tau).pred_ce.sum()
        return ce_sum, kd_sum
