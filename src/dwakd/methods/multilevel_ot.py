"""MultiLevelOT — multi-level optimal transport for cross-tokenizer KD (Cui et al., AAAI 2025).

docs/methods.md#64-multilevelot.

Per side, at the response positions of the batch:
1. logits are divided by their standard deviation over the vocabulary (+1e-4), then softmax at temperature T
   (1 for both sides, as in the reference);
2. the vocabulary columns are sorted by their probability summed over the batch's response positions
   (one global order per side and batch) and the top k = 50 kept: p̂_s, p̂_t ∈ R^{positions × k};
3. token level, at index-paired positions (k-th student ↔ k-th teacher response token, min(n, m) per sequence):
   L1 = Σ_c |p̂_s − p̂_t|, plus the "sequential logarithmic" cross-entropy term
   CE_log = −Σ_c softmax(p̂_t)_c · log softmax(p̂_s)_c (the top-k probabilities are used as logits, as in the
   reference's `KL_wo`);
4. sequence level, per sequence over all its response positions: the Sinkhorn cost Σ P ⊙ W with
   W_jk = ‖softmax(p̂_t,j / 2) − softmax(p̂_s,k / 2)‖₁, K = exp(−W/ε), ε = 0.1, 10 rounds of row then column
   normalisation, P not detached (as in the reference).
distill = (Σ L1 + 0.1·Σ CE_log + 0.1·0.001·Σ Sinkhorn) / num_items; loss = 1·CE + 1.5·distill.

Differences from the reference (2018cx/Multi-Level-OT, `models/distillation_model.py`, f = 1):
- normalisation (docs/methods.md §2.1): every sum is divided by the global student token count (the reference averages
  positions per sequence, sequences per batch, and adds the batch *sum* of Sinkhorn costs);
- masks: padding and prompt positions never enter the column sums, the L1, CE_log or the Sinkhorn problem
  (the reference pads shorter answers with zero rows that then take part in CE_log and Sinkhorn);
- the reference calls `KL_wo(teacher, student)`, which makes the *student* the target of CE_log; we follow the
  paper (teacher as target). `log_loss_reference_order: true` restores the reference's argument order.
- head padding rows are sliced off before the softmax. `kd_rate` / `kd_temperature` are not used: the
  method's own weights (`ce_weight`, `distill_weight`) and temperatures apply.
Memory: with `head_fusion: fused` (`auto` on a GPU or under 16-bit autocast) steps 1–2 of each side with a plain
linear head run in `dwakd.ops.fused_kd.fused_head_top_columns` and the CE in the fused CE op, so no (rows × V)
logits exist for the whole batch; `dense` forms the logits at the response rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dwakd.interface import ModelView
from dwakd.methods.base import DistillationInputs, DistillationMethod, LossOutput, MethodOptions, check_choice
from dwakd.methods.registry import register_method
from dwakd.modules.cross_entropy import label_cross_entropy_sum, student_cross_entropy_sum
from dwakd.modules.head_fusion import HEAD_FUSIONS, use_fused_heads
from dwakd.modules.rows import paired_rows
from dwakd.ops.fused_kd.top_columns import fused_head_top_columns


@dataclass
class MultiLevelOTOptions(MethodOptions):
    """Weights, top-k and Sinkhorn settings of MultiLevelOT (defaults: the reference / docs/methods.md §6.4)."""

    ce_weight: float = 1.0
    distill_weight: float = 1.5
    top_k: int = 50
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    log_loss_weight: float = 0.1
    sinkhorn_weight: float = 0.1 * 0.001
    sinkhorn_temperature: float = 2.0
    sinkhorn_epsilon: float = 0.1
    sinkhorn_iterations: int = 10
    log_loss_reference_order: bool = False  # True: student distribution as the target of CE_log (reference call)
    # fused: LM heads + top-k columns (and the CE) in chunked ops, no (rows × V) logits | dense: logits at the
    # response rows | auto: fused on a GPU or under bf16 autocast, else dense
    head_fusion: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)


def std_normalised_probs(logits: torch.Tensor, rows: torch.Tensor | None, vocab: int,
                         temperature: float) -> torch.Tensor:
    """(rows, vocab) softmax((z / (std_v(z) + 1e-4)) / T) at the selected flat rows (None: all), in at least fp32."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.reshape(-1, logits.shape[-1])
    z = (z if rows is None else z[rows])[:, :vocab].to(dtype)  # (rows, vocab)
    z = z / (z.std(dim=-1, keepdim=True) + 1e-4)
    return torch.softmax(z / temperature, dim=-1)


def top_columns(probs: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k) columns of `probs` in decreasing order of their sum over rows (one order for all rows)."""
    with torch.no_grad():
        order = torch.argsort(probs.sum(0), descending=True)[: min(k, probs.shape[-1])]
    return probs.index_select(1, order)


def pad_columns(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad (rows, c) to (rows, k) when a vocabulary has fewer than k tokens."""
    return x if x.shape[1] >= k else torch.cat([x, x.new_zeros(x.shape[0], k - x.shape[1])], 1)


def sinkhorn_cost(x: torch.Tensor, y: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Σ P ⊙ W for W = pairwise L1 between rows of x (a, c) and y (b, c), P from K = exp(−W/ε) by row/column scaling."""
    cost = torch.cdist(x.unsqueeze(0), y.unsqueeze(0), p=1).squeeze(0)  # (a, b)
    plan = torch.exp(-cost / epsilon)
    for _ in range(iterations):
        plan = plan / plan.sum(dim=1, keepdim=True)
        plan = plan / plan.sum(dim=0, keepdim=True)
    return (plan * cost).sum()


@register_method
class MultiLevelOT(DistillationMethod):
    """Token-level (L1 + CE on top-k sorted columns) and sequence-level (Sinkhorn) optimal transport."""

    name = "multilevel_ot"
    title = "MultiLevelOT"
    Options = MultiLevelOTOptions
    teacher_distribution = "logits"  # divides the teacher's logits by their std over the whole vocabulary

    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        o = self.options
        s_out, t_out = inputs.student_out, inputs.teacher_out
        s_mask, t_mask = inputs.student.label_mask, inputs.teacher.label_mask  # (batch, n), (batch, m)
        s_rows = s_mask.reshape(-1).nonzero().squeeze(1)  # every response position, row-major
        t_rows = t_mask.reshape(-1).nonzero().squeeze(1)
        k = o.top_k
        fused = use_fused_heads(o.head_fusion, s_mask.device)
        if fused and s_out.linear_head_weight() is not None:  # no (rows × V) logits: the heads run in the ops
            ce = student_cross_entropy_sum(s_out, inputs.student, "fused") / inputs.num_items
            p_s = self.top_probs(s_out, s_rows, o.student_temperature, True)  # (rows_s, k)
        else:
            s_logits, _ = s_out.label_logits(inputs.student)  # (rows_s, R_s): heads run at the label rows only
            ce = label_cross_entropy_sum(s_logits, inputs.student, s_out.vocab_size) / inputs.num_items
            p_s = pad_columns(top_columns(std_normalised_probs(s_logits, None, s_out.vocab_size,
                                                               o.student_temperature), k), k)  # (rows_s, k)
        with torch.no_grad():
            p_t = self.top_probs(t_out, t_rows, o.teacher_temperature, fused)  # (rows_t, k)

        # token level: the k-th response position of one side against the k-th of the other
        s_pair, t_pair = paired_rows(s_mask, t_mask)
        s_at = torch.searchsorted(s_rows, s_pair)  # position of each paired row inside p_s
        t_at = torch.searchsorted(t_rows, t_pair)
        ps, pt = p_s.index_select(0, s_at), p_t.index_select(0, t_at)  # (pairs, k)
        l1 = (ps - pt).abs().sum()
        if o.log_loss_reference_order:
            log_loss = -(torch.softmax(ps, -1) * torch.log_softmax(pt, -1)).sum()
        else:
            log_loss = -(torch.softmax(pt, -1) * torch.log_softmax(ps, -1)).sum()

        # sequence level: one Sinkhorn problem per sequence between all its teacher and student positions
        x = torch.softmax(p_t / o.sinkhorn_temperature, -1)
        y = torch.softmax(p_s / o.sinkhorn_temperature, -1)
        s_count, t_count = s_mask.sum(-1).tolist(), t_mask.sum(-1).tolist()
        sinkhorn = l1.new_zeros(())
        s_start = t_start = 0
        for n_b, m_b in zip(s_count, t_count):
            if n_b and m_b:
                sinkhorn = sinkhorn + sinkhorn_cost(x[t_start : t_start + m_b], y[s_start : s_start + n_b],
                                                    o.sinkhorn_epsilon, o.sinkhorn_iterations)
            s_start, t_start = s_start + n_b, t_start + m_b

        n = inputs.num_items
        distill = (l1 + o.log_loss_weight * log_loss + o.sinkhorn_weight * sinkhorn) / n
        loss = o.ce_weight * ce + o.distill_weight * distill
        parts = {"ce": ce.detach(), "token_l1": (l1 / n).detach(), "log_loss": (log_loss / n).detach(),
                 "sinkhorn": (sinkhorn / n).detach(), "distill": distill.detach()}
        return LossOutput(loss, parts)

    def top_probs(self, out: ModelView, rows: torch.Tensor, temperature: float, fused: bool) -> torch.Tensor:
        """(rows, top_k) probabilities of one side at its top columns (steps 1–2), zero-padded to top_k: through the
        fused op where asked and the view has a plain linear head, else from the logits at `rows`."""
        k = self.options.top_k
        weight = out.linear_head_weight() if fused else None
        if weight is not None:
            probs = fused_head_top_columns(out.hidden_at(rows), weight, out.vocab_size, temperature, k)
        else:
            probs = top_columns(std_normalised_probs(out.logits_at(rows), None, out.vocab_size, temperature), k)
        return pad_columns(probs, k)
