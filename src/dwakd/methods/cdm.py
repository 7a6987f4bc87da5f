"""CDM — Contextual Dynamic Mapping (Chen et al., ACL Findings 2025, arXiv 2502.11104).

Full description, options and departures: docs/methods.md#66-cdm.

Per sequence, over the response label tokens of both sides (what each position predicts):
1. Entropy weights: H = entropy of the model's own next-token distribution at each position, min–max normalised
   within the sequence (Ĥ = 0 when all are equal), w = ⌊3 + 3·σ(4Ĥ − 2)⌋ ∈ {3, 4, 5}; one per side, no gradient.
2. Alignment: DTW over the token texts (spaces removed) with cost c(i, j) = Lev(t_i, s_j)·w_T(i)·w_S(j), 0 between
   the two EOS tokens (as in the reference; it cannot move a path that ends at the EOS pair anyway); accumulated
   cost D(i, j) = c(i, j) + min(D(i−1, j), D(i, j−1), D(i−1, j−1)) and a backtrack that prefers the diagonal
   (`dwakd.alignment.dtw.dtw_path`, compiled). Rows are teacher tokens.
3. Pooling to a common length (`dwakd.alignment.dynamic_map.pooling_plan`): teacher logits averaged over the
   teacher tokens aligned to each student token, then both sides averaged over the student tokens aligned to one
   teacher token (consecutive identical groups merged once).
4. Dynamic vocabulary mapping at every pooled position (`dynamic_vocab_map`): the teacher's top-k candidates
   (k = 100) are mapped to student ids — by exact text where the vocabularies share the token, otherwise to the
   student top-k candidate at that position with the smallest normalised edit distance Lev/(|a| + |b|) below
   θ = 0.3 — and the student's top-k candidates are mapped to teacher ids the same way. The 2k columns
   [teacher candidates | student candidates] hold the teacher's and the student's pooled logits of the mapped
   pairs; unmapped columns are dropped (−1e4 on both sides, as in the reference).
5. KD: D(teacher columns → student columns) with the project's divergence family (`kd_objective`, forward KL by
   default) at τ = kd_temperature, summed over pooled positions.
loss = (1 − kd_rate)·CE + kd_rate·Σ_positions D / num_items.

Which reference: the authors' repository (pppa2019/ContexualDynamicMapping) could not be retrieved here; two public
copies were read — a FuseLLM-style trainer with the paper's defaults (top-k 100, θ 0.3, kd_temperature 0.8,
loss = 0.9·CE + 0.1·KD) whose final mapping never reads the student's logits, and a DSKD-framework port (CDMKLD)
with the complete two-direction mapping. The algorithm above is the paper's as the port implements it, with these
choices and fixes:
- the port returns the second direction's columns swapped (student logits in the teacher vector and vice versa);
  here every column pairs the teacher's logit with the student's logit of the mapped token;
- the port maps teacher candidates in place, so a mapping found at one position stays for every later position
  of the sequence, and it filters candidates with a set of *teacher* ids that are unmapped (a vocabulary mix-up);
  here each position maps with its own candidates only (the paper's context dependence), nothing is filtered,
  and ties go to the better-ranked candidate (the port's set iteration order is arbitrary);
- id 0 means "unmapped" in the reference (so token 0 can never be mapped); here −1;
- the static map is exact equality of decoded bytes (`dwakd.alignment.vocab_map.exact_text_map`, EOS ↔ EOS; the
  reference loads a precomputed exact-match file); the dynamic map's edit distance is over bytes;
- the reference computes entropies with +1e-10 on every probability and divides by (max − min) even when it is 0
  (NaN weights); here the exact entropy and Ĥ = 0 for a constant sequence;
- the reference aligns the *input* tokens at the label positions (the previous tokens) while its logits predict
  the label tokens; here the label tokens are aligned (each pair predicts the same next token from the same text);
- KD: the reference's KL is Σ p_T·(τ²·log p_T − log softmax(z_S/τ)) with an unscaled teacher (the τ² only shifts
  the value); here D(softmax(z_T/τ) → softmax(z_S/τ)), and `temperature_on_teacher: false` gives the reference's
  unscaled teacher. Sums are divided by the global student token count (the rule of every method; the reference
  takes a mean over positions), and loss = (1 − kd_rate)·CE + kd_rate·KD (the DSKD port's form; the original uses
  0.9·CE + 0.1·KD, i.e. kd_rate = 0.1).
`entropy_weights: false` aligns with the plain edit distance (MinED's DTW) for ablations.
Speed: the reference loops in Python over every DTW cell (an edit distance per cell), decodes 2k tokens per
position and scans up to k² pairs in Python, one sequence at a time (why the DWA-KD paper ran it at batch 1). Here
the edit-distance matrix is one rapidfuzz call per sequence, DTW, pooling and mapping are numba-compiled, heads
run at label rows only, and pooling, top-k and the divergence run batched on the models' device; batch > 1 works.
Memory: `head_fusion: fused` (`auto` on a GPU or under 16-bit autocast) never forms (rows × V) logits for the
batch on a side whose view has a plain linear head (`LabelRows`): everything up to the column gather is linear in
the logits, so the hidden rows are pooled first (P·H, then (P·H)·Wᵀ = P·(H·Wᵀ)); the entropies and the pooled
rows' top-k come from forward-only chunked passes over the head, and the 2k KD columns per pooled row from a small
differentiable gather op (`dwakd.ops.fused_kd.head_columns`); the CE runs through the fused CE op. Same loss up to
rounding (pooling before the head rounds differently; top-k candidates that tie within rounding may be ordered or
chosen differently). A side with dense logits (teacher cache, LoRA-wrapped head) keeps the dense path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dwakd.alignment.dtw import dtw_path, edit_distance_matrix
from dwakd.alignment.dynamic_map import byte_arrays, dynamic_vocab_map, pooling_plan
from dwakd.alignment.token_strings import token_table
from dwakd.alignment.vocab_map import exact_text_map
from dwakd.interface import ModelView, label_rows
from dwakd.methods.base import (
    DistillationInputs,
    DistillationMethod,
    LossOutput,
    MethodContext,
    MethodOptions,
    OptionError,
    TokenView,
    check_choice,
    check_range,
)
from dwakd.methods.registry import register_method
from dwakd.modules.cross_entropy import label_cross_entropy_sum, student_cross_entropy_sum
from dwakd.modules.divergences import check_divergence, compute_dtype, divergence, no_autocast
from dwakd.modules.head_fusion import HEAD_FUSIONS, use_fused_heads
from dwakd.ops.fused_kd.head_columns import gathered_head_logits, head_entropy, head_topk, logit_entropy

UNMAPPED_LOGIT = -1e4  # logit of dropped columns on both sides (the reference's constant)
CHUNK_ELEMENTS = 1 << 24  # fp32 elements per chunk when computing entropies


@dataclass
class CDMOptions(MethodOptions):
    """CDM knobs (the reference's names in brackets); kd_rate and kd_temperature as in every method."""

    kd_objective: str = "fkl"  # divergence family name (the reference uses forward KL)
    top_k: int = 100  # [topk] candidates per side and pooled position
    similarity_threshold: float = 0.3  # [simi_threadshold] max normalised edit distance of a dynamic match
    temperature_on_teacher: bool = True  # false: the reference's unscaled teacher distribution
    entropy_weights: bool = True  # false: DTW on the plain edit distance (ablation)
    # fused: entropies, pooling, top-k and the KD columns from hidden rows and head weights (and the CE through the
    # fused CE), no (rows × V) logits | dense: logits at the label rows | auto: fused on a GPU or under bf16 autocast
    head_fusion: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)
        check_divergence("kd_objective", self.kd_objective)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise OptionError("top_k", f"must be a positive integer; got {self.top_k!r}")
        check_range("similarity_threshold", self.similarity_threshold, 0.0, 1.0)


@dataclass
class CDMAlignment:
    """Pooled positions of a batch as sparse averaging plans over the label rows of each side."""

    groups: int  # pooled positions in the batch
    student: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (pooled row, label row, weight) triples
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    paths: list[np.ndarray]  # DTW path per sequence, (steps, 2) [teacher, student] local indices


def entropy_factors(entropy: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    """⌊3 + 3·σ(4Ĥ − 2)⌋ with Ĥ the entropy min–max normalised within each segment (0 where max = min)."""
    fill = torch.full((segments,), float("inf"), dtype=entropy.dtype, device=entropy.device)
    low = fill.scatter_reduce(0, segment, entropy, "amin")
    high = (-fill).scatter_reduce(0, segment, entropy, "amax")
    span = (high - low)[segment]
    norm = torch.where(span > 0, (entropy - low[segment]) / span.clamp_min(torch.finfo(span.dtype).tiny),
                       torch.zeros_like(entropy))
    return torch.floor(3.0 + 3.0 * torch.sigmoid(4.0 * norm - 2.0))


def row_entropy(logits: torch.Tensor, vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(rows,) entropy of softmax(logits[:, :vocab]) in at least fp32, chunked, without gradient (`logit_entropy`)."""
    dtype = compute_dtype(logits)
    out = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
    chunk = max(1, chunk_elements // max(1, vocab))
    with torch.no_grad(), no_autocast(logits):
        for lo in range(0, logits.shape[0], chunk):
            out[lo:lo + chunk] = logit_entropy(logits[lo:lo + chunk, :vocab].to(dtype))
    return out


@dataclass
class LabelRows:
    """One side's label rows (or pooled rows of them) as CDM reads them: dense logits (rows, head rows), or, for a
    view with a plain linear head under `head_fusion: fused`, hidden states (rows, d) and the head's weight, whose
    logits h·Wᵀ the `dwakd.ops.fused_kd.head_columns` ops form chunk by chunk."""

    values: torch.Tensor  # logits, or hidden states when `weight` is set
    weight: torch.Tensor | None
    vocab: int

    @classmethod
    def of(cls, out: ModelView, view: TokenView, fused: bool) -> LabelRows:
        """The label rows of `view` (row-major), fused where asked and the view has a plain linear head."""
        weight = out.linear_head_weight() if fused else None
        if weight is None:
            return cls(out.label_logits(view)[0], None, out.vocab_size)
        return cls(out.hidden_at(label_rows(view)[0]), weight, out.vocab_size)

    def entropy(self) -> torch.Tensor:
        """(rows,) entropy of each row's distribution over the real vocabulary, without gradient."""
        if self.weight is None:
            return row_entropy(self.values.detach(), self.vocab)
        return head_entropy(self.values.detach(), self.weight.detach(), self.vocab)

    def pooled(self, plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor], groups: int) -> LabelRows:
        """The rows pooled by `plan` (`CDM.pool`); for hidden rows P·H, whose logits (P·H)·Wᵀ are P·(H·Wᵀ)."""
        width = self.vocab if self.weight is None else self.values.shape[1]
        return LabelRows(CDM.pool(self.values, plan, groups, width), self.weight, self.vocab)

    def top(self, k: int) -> torch.Tensor:
        """(rows, min(k, vocab)) indices of each row's largest logits, in decreasing order, without gradient."""
        if self.weight is None:
            return self.values.detach().topk(min(k, self.vocab), dim=-1).indices
        return head_topk(self.values.detach(), self.weight.detach(), self.vocab, k)

    def columns(self, cols: torch.Tensor) -> torch.Tensor:
        """(rows, C) logits at columns `cols` (int64 < vocab) of each row, differentiable as the rows are."""
        if self.weight is None:
            return self.values.gather(1, cols)
        return gathered_head_logits(self.values, self.weight, self.vocab, cols)


@register_method
class CDM(DistillationMethod):
    """Entropy-weighted DTW alignment, pooling, and KD over context-dependent top-k vocabulary mappings."""

    name = "cdm"
    title = "CDM"
    Options = CDMOptions
    needs_teacher = True

    def __init__(self, options: CDMOptions, context: MethodContext):
        super().__init__(options, context)
        if context.teacher_tokenizer is None:
            raise ValueError("cdm needs the teacher's tokenizer (MethodContext.teacher_tokenizer)")
        student_table = token_table(context.student_tokenizer)
        teacher_table = token_table(context.teacher_tokenizer)
        self.teacher_to_student = exact_text_map(teacher_table, student_table)  # (V_t,) −1: no exact counterpart
        self.student_to_teacher = exact_text_map(student_table, teacher_table)  # (V_s,)
        self.student_bytes = byte_arrays(student_table)  # texts with spaces removed, for edit distances
        self.teacher_bytes = byte_arrays(teacher_table)
        self.student_strings = student_table.stripped_strings()
        self.teacher_strings = teacher_table.stripped_strings()
        self.student_eos = student_table.eos_id
        self.teacher_eos = teacher_table.eos_id

    # --------------------------------------------------------------------------------------- alignment
    def align(self, student: TokenView, teacher: TokenView, student_factor: torch.Tensor | None,
              teacher_factor: torch.Tensor | None) -> CDMAlignment:
        """Weighted DTW per sequence and the pooling plans, as flat label-row indices (row-major label order).

        `*_factor` are the entropy weights per label row (None: weight 1).
        """
        s_labels, t_labels = student.labels.cpu().numpy(), teacher.labels.cpu().numpy()
        s_count, t_count = (s_labels != -100).sum(1), (t_labels != -100).sum(1)
        s_start, t_start = np.cumsum(s_count) - s_count, np.cumsum(t_count) - t_count  # first label row per sequence
        s_w = student_factor.cpu().numpy().astype(np.float64) if student_factor is not None else None
        t_w = teacher_factor.cpu().numpy().astype(np.float64) if teacher_factor is not None else None
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("sg", "sr", "sw", "tg", "tr", "tw")}
        paths, groups = [], 0
        for b in range(s_labels.shape[0]):
            s_ids = s_labels[b][s_labels[b] != -100]
            t_ids = t_labels[b][t_labels[b] != -100]
            n, m = len(s_ids), len(t_ids)
            if n == 0 or m == 0:
                paths.append(np.zeros((0, 2), dtype=np.int64))
                continue
            cost = edit_distance_matrix([self._text(self.teacher_strings, i) for i in t_ids],
                                        [self._text(self.student_strings, i) for i in s_ids])  # (m, n)
            if t_w is not None:
                cost *= t_w[t_start[b]:t_start[b] + m, None] * s_w[None, s_start[b]:s_start[b] + n]
            if self.teacher_eos is not None and self.student_eos is not None:
                cost[np.ix_(t_ids == self.teacher_eos, s_ids == self.student_eos)] = 0.0  # EOS ↔ EOS is free
            path = dtw_path(cost)
            paths.append(path)
            count, (sg, sr, sw), (tg, tr, tw) = pooling_plan(path, n, m)
            parts["sg"].append(sg + groups), parts["sr"].append(sr + s_start[b]), parts["sw"].append(sw)
            parts["tg"].append(tg + groups), parts["tr"].append(tr + t_start[b]), parts["tw"].append(tw)
            groups += count
        device = student.labels.device

        def cat(key: str, dtype: torch.dtype) -> torch.Tensor:
            values = np.concatenate(parts[key]) if parts[key] else np.zeros(0)
            return torch.as_tensor(values, dtype=dtype, device=device)

        return CDMAlignment(groups, (cat("sg", torch.long), cat("sr", torch.long), cat("sw", torch.float64)),
                            (cat("tg", torch.long), cat("tr", torch.long), cat("tw", torch.float64)), paths)

    @staticmethod
    def _text(strings: list[str], token_id: int) -> str:
        return strings[token_id] if 0 <= token_id < len(strings) else ""

    @staticmethod
    def pool(rows: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor], groups: int,
             width: int) -> torch.Tensor:
        """(groups, width) weighted sums of the first `width` columns of label rows — logits (width = vocab) or
        hidden states (width = d) — a sparse averaging matrix times the rows, ≥ fp32, differentiable."""
        group, row, weight = plan
        dtype = compute_dtype(rows)
        with no_autocast(rows):
            dense = rows[:, :width].to(dtype)  # (K, width)
            matrix = torch.sparse_coo_tensor(torch.stack([group, row]), weight.to(dtype), (groups, rows.shape[0]),
                                             check_invariants=False)
            return torch.sparse.mm(matrix, dense)

    def mapped_columns(self, pooled_student: LabelRows, pooled_teacher: LabelRows):
        """(student columns, teacher columns, mapped mask), each (groups, 2k): both directions of the dynamic map."""
        s_top = pooled_student.top(self.options.top_k)  # (G, k_s)
        t_top = pooled_teacher.top(self.options.top_k)  # (G, k_t)
        s_top_np, t_top_np = s_top.cpu().numpy(), t_top.cpu().numpy()
        theta = self.options.similarity_threshold
        t2s = dynamic_vocab_map(t_top_np, s_top_np, self.teacher_to_student, self.teacher_bytes, self.student_bytes,
                                theta)  # (G, k_t) student id per teacher candidate
        s2t = dynamic_vocab_map(s_top_np, t_top_np, self.student_to_teacher, self.student_bytes, self.teacher_bytes,
                                theta)  # (G, k_s) teacher id per student candidate
        t2s = torch.as_tensor(t2s, device=s_top.device)
        s2t = torch.as_tensor(s2t, device=s_top.device)
        mask = torch.cat([t2s >= 0, s2t >= 0], dim=1)  # (G, k_t + k_s)
        student_cols = pooled_student.columns(torch.cat([t2s.clamp_min(0), s_top], 1))
        with torch.no_grad():
            teacher_cols = pooled_teacher.columns(torch.cat([t_top, s2t.clamp_min(0)], 1))
        student_cols = student_cols.masked_fill(~mask, UNMAPPED_LOGIT)
        teacher_cols = teacher_cols.masked_fill(~mask, UNMAPPED_LOGIT)
        return student_cols, teacher_cols, mask

    # -------------------------------------------------------------------------------------------- loss
    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        opts = self.options
        student, teacher = inputs.student, inputs.teacher
        s_out, t_out = inputs.student_out, inputs.teacher_out
        fused = use_fused_heads(opts.head_fusion, student.labels.device)
        s_rows = LabelRows.of(s_out, student, fused)  # (K_s, R_s) logits or (K_s, d_s) hidden rows
        if s_rows.weight is None:
            ce = label_cross_entropy_sum(s_rows.values, student, s_out.vocab_size) / inputs.num_items
        else:  # no (K × V) logits: the head and the CE in one chunked op
            ce = student_cross_entropy_sum(s_out, student, "fused") / inputs.num_items
        with torch.no_grad():
            t_rows = LabelRows.of(t_out, teacher, fused)  # (K_t, ·)
        s_factor = t_factor = None
        if opts.entropy_weights:
            s_seq = student.label_mask.nonzero()[:, 0]  # (K_s,) sequence of each label row
            t_seq = teacher.label_mask.nonzero()[:, 0]
            batch = student.labels.shape[0]
            s_factor = entropy_factors(s_rows.entropy(), s_seq, batch)
            t_factor = entropy_factors(t_rows.entropy(), t_seq, batch)
        alignment = self.align(student, teacher, s_factor, t_factor)
        kd_sum = s_rows.values.new_zeros((), dtype=compute_dtype(s_rows.values))
        mapped = 0.0
        if alignment.groups:
            pooled_s = s_rows.pooled(alignment.student, alignment.groups)  # (G, ·)
            with torch.no_grad():
                pooled_t = t_rows.pooled(alignment.teacher, alignment.groups)
            student_cols, teacher_cols, mask = self.mapped_columns(pooled_s, pooled_t)
            tau = opts.kd_temperature
            if not opts.temperature_on_teacher:
                teacher_cols = teacher_cols * tau  # softmax(teacher·τ/τ): the reference's unscaled teacher
            kd_sum = kd_sum + divergence(student_cols, teacher_cols.detach(), opts.kd_objective, tau).sum()
            mapped = float(mask.float().mean())
        kd = kd_sum / inputs.num_items
        loss = (1.0 - opts.kd_rate) * ce + opts.kd_rate * kd
        valid = max(1, int(student.label_mask.sum()))
        return LossOutput(loss, {"ce": ce.detach(), "kd": kd.detach()},
                          {"mapped_fraction": mapped, "pooled_per_token": alignment.groups / valid})


