"""ALM — Approximate Likelihood Matching (Minixhofer, Vulić, Ponti 2025, arXiv 2503.20083; reference: tokenkit).

Full description, options and departures: docs/methods.md#65-alm.

Both tokenizations of the response are cut into chunks that end at the same character offset on both sides
(`dwakd.alignment.chunks.common_chunks`: the shortest such chunks, tokenkit's "unconstrained" alignment, or only
before whitespace-initial tokens with `chunks: space`). A chunk's log-likelihood on each side is the sum of the
log-probabilities of its label tokens, log p(c) = Σ_{t∈c} log p(x_t | x_<t) (clipped at 0). Teacher and student chunk
likelihoods are compared with a binarised f-divergence at temperature τ = `binarization_temperature` (100): with
a = log p_T(c)/τ − ε and b = log p_S(c)/τ − ε (ε = 1e-6), the default `binary_ce` is
    ℓ(c) = −[eᵃ·b + (1 − eᵃ)·log(1 − eᵇ)],
the cross-entropy between Bernoulli(p_T(c)^{1/τ}) and Bernoulli(p_S(c)^{1/τ}) (binary KL plus a term constant in the
student). Other choices (`divergence`): `binary_kl` (the same gradient, 0 at a match), `reverse_binary_kl`,
`binary_kl_temp_limit` (the τ → ∞ limit, without τ), `abs` (|log p_T − log p_S|), `abs_exp` (|eᵃ − eᵇ|).

Outcome-chunk debiasing (tokenkit's recommended `merge_by_space_prob+append_space`, on by default):
- `merge_by_space_prob`: consecutive chunks are merged until one ends where the *teacher* gives probability
  > `space_threshold` (0.1) to "the next token starts a word", i.e. the next token is in the space set (first byte a
  space, tab or newline, or a special token such as EOS; `space_mask`; for WordPiece vocabularies, which write no
  spaces, every token without the "##" continuation prefix counts as starting a word);
- `append_space`: each (merged) chunk's log-likelihood gets log P(next token in the space set) at its end, on each
  side from that side's own next-token distribution, so both sides score "this text, then a word boundary".
Optional hidden-state term (`latents`, off by default; the reference notes it did not help outside
self-distillation): at the last token of every (unmerged) chunk, Σ_d (W h_s − h_t)_d² / E_chunks[h_t,d²] / d_t with
W = Linear(d_s → d_t) trained with the projector learning rate (tokenkit's `l2_channelwise`, `latents_do_project`).

loss = (1 − kd_rate)·CE + kd_rate·(alm_weight·Σ_c w_c·ℓ(c) + latents_weight·Σ_c latent(c)) / num_items,
w_c = 1 (`chunk_weight: chunk`) or the number of teacher tokens in c (`teacher_tokens`).

Choices and differences from the reference (tokenkit `losses.compute_alm_loss`, `align.get_alignment_indices`):
- what the DWA-KD paper compared against (Appendix D.1, "official descriptions/implementations under the same
  training recipe") is the reference's distillation recipe: SFT + `alm_unconstrained`, `binary_ce`, τ = 100,
  `merge_by_space_prob+append_space` with threshold 0.1, chunk-count weights. The defaults are that recipe;
- chunks come from character offsets, not from cumulative lengths of byte-level token strings: a chunk never ends
  inside a character (the reference, working on bytes, may cut between two bytes of one character when both
  tokenizers do), and no "Ġ"/"▁" replacement tables are needed. Only the response is chunked (the reference
  chunks prompt and response and masks the prompt's tokens out of the sums);
- EOS↔EOS is a chunk of its own (the reference aligns special tokens through a replacement table); after the EOS
  chunk there is no next token, so its appended space log-probability is 0 on both sides (the text has ended,
  which is a word boundary);
- a side truncated by `max_length` contributes no chunk after its last common end (see `common_chunks`);
- normalisation: Σ over chunks divided by the global student token count (the project's rule for every term;
  gradient accumulation and data parallelism stay exact). The reference divides by the number of chunks in the
  batch, so its ALM term is (chunks / student tokens) times ours — about 0.8–1 for the paper's tokenizer pairs.
  CE:ALM is 1:1 here as in the reference's distillation example (`losses=[sft, alm_unconstrained]`, equal
  weights) and the overall factor ½ of kd_rate = 0.5 does not change Adam's updates;
- the reference's GradMag loss balancing (`multitask_aggregation_fn`, a training-loop feature), `alm_unbiased`
  chunks (need precomputed tokenizer-pair bias matrices), `eos_as_space` and the Rényi / Schulman-k2/k3
  divergences are not implemented; `kd_temperature` is not used (τ is `binarization_temperature`);
- the latent term uses response chunks only (the reference's latents also cover the prompt), the final hidden
  states only, and always projects (cross-tokenizer pairs do not share a hidden space).
Memory and speed (`head_fusion`): with `dense`, heads run only at the label rows of both models
(`ModelView.label_logits`) and log p(label) and the space log-mass come from one chunked fp32 pass over those logits
whose backward recomputes the softmax (`label_log_probs`), so no (rows, vocab) copy is kept for backward. With
`fused` (`auto` on a GPU or under bf16 autocast) each side with a plain linear head reads its hidden states at the
label rows and its head weight instead (`dwakd.ops.fused_kd.fused_head_label_log_probs`): the logits are formed a
chunk of rows at a time, in forward and again in the student's backward, so no (rows × vocab) logits exist for the
batch; a side without one (a teacher cache, a LoRA-wrapped head) keeps the dense path. Same loss to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dwakd.alignment.chunks import ChunkPlan, common_chunks
from dwakd.alignment.token_strings import TokenTable, token_table
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
    check_positive,
    check_range,
)
from dwakd.methods.registry import register_method
from dwakd.modules.divergences import compute_dtype, no_autocast
from dwakd.modules.head_fusion import HEAD_FUSIONS, use_fused_heads
from dwakd.modules.projectors import model_dims
from dwakd.ops.fused_kd.label_log_probs import fused_head_label_log_probs, label_log_probs
from dwakd.ops.fused_kd.reference import label_log_probs_reference  # noqa: F401 - re-exported for callers, tests

DIVERGENCES = ("binary_ce", "binary_kl", "reverse_binary_kl", "binary_kl_temp_limit", "abs", "abs_exp")
CHUNK_KINDS = ("unconstrained", "space")
CHUNK_WEIGHTS = ("chunk", "teacher_tokens")
SPACE_PARTS = ("space", "tab", "newline", "special")
EPSILON = 1e-6  # keeps binarised log-likelihoods strictly below 0 (the reference's epsilon)
LATENT_EPSILON = 1e-8  # added to the channel normaliser (the reference's epsilon)


@dataclass
class ALMOptions(MethodOptions):
    """ALM knobs (the reference's names in brackets). kd_rate weighs CE against the distillation terms."""

    divergence: str = "binary_ce"  # [alm_diff_fn] one of DIVERGENCES
    binarization_temperature: float = 100.0  # [binarization_temp] τ of the binarised divergence
    chunks: str = "unconstrained"  # [alm_unconstrained | alm_space] where chunks may end
    merge_by_space_prob: bool = True  # [alm_mode] merge chunks until the teacher's word-boundary probability is high
    append_space: bool = True  # [alm_mode] add log P(next token starts a word) at each chunk end, both sides
    space_threshold: float = 0.1  # [tokenizer_pair_bias_threshold] for merge_by_space_prob
    space_mask: str = "space+tab+newline+special"  # [space_mask_mode] which next tokens count as a word boundary
    chunk_weight: str = "chunk"  # [distill_main_path_numerator] chunk_count: "chunk", token_count: "teacher_tokens"
    alm_weight: float = 1.0  # [loss_weights] of the ALM term inside the KD part
    latents: bool = False  # [alm_latents] the hidden-state term at chunk ends
    latents_weight: float = 1.0  # [loss_weights] of the hidden-state term
    # fused: log p(label) and the space log-mass from hidden states and head weights, no (rows × V) logits |
    # dense: logits at the label rows | auto: fused on a GPU or under bf16 autocast, else dense
    head_fusion: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_positive("binarization_temperature", self.binarization_temperature)
        check_choice("chunks", self.chunks, CHUNK_KINDS)
        check_range("space_threshold", self.space_threshold, 0.0, 1.0)
        parts = str(self.space_mask).split("+")
        if not all(p in SPACE_PARTS for p in parts):
            raise OptionError("space_mask", f"must join some of {', '.join(SPACE_PARTS)} with '+'; got "
                                            f"{self.space_mask!r}")
        check_choice("chunk_weight", self.chunk_weight, CHUNK_WEIGHTS)
        check_positive("alm_weight", self.alm_weight, allow_zero=True)
        check_positive("latents_weight", self.latents_weight, allow_zero=True)
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)


def space_token_mask(table: TokenTable, mode: str, word_initial: np.ndarray | None = None) -> np.ndarray:
    """(vocab,) bool: tokens whose text starts with a space / tab / newline, or special tokens (per `mode`).

    Tokenizers that do not write spaces (WordPiece) pass `word_initial` (tokens without the continuation prefix);
    those count as starting with a space.
    """
    parts = set(mode.split("+"))
    firsts = {b" "[0]: "space", b"\t"[0]: "tab", b"\n"[0]: "newline"}
    wanted = {byte for byte, name in firsts.items() if name in parts}
    out = np.fromiter((len(d) > 0 and d[0] in wanted for d in table.data), dtype=bool, count=len(table.data))
    if word_initial is not None and "space" in parts:
        out |= word_initial & ~table.special
    if "special" in parts:
        out |= table.special
    return out


def word_initial_tokens(tokenizer, table: TokenTable) -> np.ndarray | None:
    """For WordPiece vocabularies: (vocab,) bool, tokens without the continuation prefix; None for other kinds."""
    if table.kind != "wordpiece":
        return None
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    prefix = getattr(decoder, "prefix", "##") or "##"
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(table))))
    return np.array([bool(t) and not t.startswith(prefix) for t in tokens], dtype=bool)


# ------------------------------------------------------------------------------- binarised divergences
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable at both ends."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def binarised_divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str,
                         temperature: float) -> torch.Tensor:
    """Elementwise ALM divergence between teacher and student chunk log-likelihoods (both ≤ 0), see the module doc."""
    if kind == "abs":
        return (teacher_logp - student_logp).abs()
    if kind == "binary_kl_temp_limit":
        a, b = teacher_logp - EPSILON, student_logp - EPSILON
        return (a - b) + a * torch.log(-b) - a * torch.log(-a)
    a = teacher_logp / temperature - EPSILON
    b = student_logp / temperature - EPSILON
    if kind == "abs_exp":
        return (torch.exp(a) - torch.exp(b)).abs()
    if kind == "binary_ce":
        return -(torch.exp(a) * b - torch.expm1(a) * log1mexp(b))
    if kind == "binary_kl":
        return torch.exp(a) * (a - b) - torch.expm1(a) * (log1mexp(a) - log1mexp(b))
    if kind == "reverse_binary_kl":
        return torch.exp(b) * (b - a) - torch.expm1(b) * (log1mexp(b) - log1mexp(a))
    raise ValueError(f"unknown ALM divergence {kind!r}")  # pragma: no cover - options validate this


@dataclass
class ChunkScores:
    """Chunk-level quantities of one ALM pass (chunks numbered as in the `ChunkPlan`)."""

    plan: ChunkPlan
    student_logp: torch.Tensor  # (groups,) log-likelihood of each (merged) chunk, space term included
    teacher_logp: torch.Tensor  # (groups,)
    teacher_tokens: torch.Tensor  # (groups,) teacher tokens per (merged) chunk
    group: torch.Tensor  # (chunks,) merged chunk of each chunk


def _scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Σ of values per index, (size,); entries with index −1 are skipped. Differentiable w.r.t. values."""
    keep = index >= 0
    return values.new_zeros(size).index_add(0, index[keep], values[keep])


def side_label_log_probs(out: ModelView, view: TokenView, space: torch.Tensor | None, fused: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One side's (K,) log p(label) and space log-mass at its label rows, and the (batch·length,) map from flat
    positions to those rows (−1 off the labels). With `fused` and a plain linear head, from hidden states and head
    weights (`fused_head_label_log_probs`, no (K × V) logits); otherwise from the label-row logits."""
    labels = view.labels[view.label_mask]  # (K,) row-major, the order of `label_rows`
    weight = out.linear_head_weight() if fused else None
    if weight is None:
        logits, index = out.label_logits(view)  # (K, R): the head runs at label rows only
        return *label_log_probs(logits, labels, out.vocab_size, space), index
    rows, index = label_rows(view)
    return *fused_head_label_log_probs(out.hidden_at(rows), weight, out.vocab_size, labels, space), index


@register_method
class ALM(DistillationMethod):
    """Binarised f-divergence between teacher and student likelihoods of co-terminating response chunks."""

    name = "alm"
    title = "ALM"
    teacher_distribution = "logits"  # the teacher's log-probability of each label token must be exact
    Options = ALMOptions
    needs_teacher = True

    def __init__(self, options: ALMOptions, context: MethodContext):
        super().__init__(options, context)
        if context.teacher_tokenizer is None:
            raise ValueError("alm needs the teacher's tokenizer (MethodContext.teacher_tokenizer)")
        self.needs_hidden_states = options.latents  # instance override of the class default
        if options.latents:
            self.teacher_cache_refusal = ("its latents term reads teacher hidden states at chunk ends, which a cache "
                                          "does not hold at every position")
        need_space = options.append_space or options.merge_by_space_prob or options.chunks == "space"
        self.need_space = need_space
        if need_space:
            for side, tokenizer in (("student", context.student_tokenizer), ("teacher", context.teacher_tokenizer)):
                table = token_table(tokenizer)
                mask = space_token_mask(table, options.space_mask, word_initial_tokens(tokenizer, table))
                if not mask.any():
                    raise ValueError(f"alm: no {side} token is in the space set {options.space_mask!r}; set "
                                     "method.options.append_space/merge_by_space_prob to false for this tokenizer")
                self.register_buffer(f"{side}_space", torch.from_numpy(mask), persistent=False)
        self.latent_projector = None
        if options.latents:
            if context.student_config is None or context.teacher_config is None:
                raise ValueError("alm latents need both model configs (MethodContext.student_config/teacher_config)")
            d_s, d_t = model_dims(context.student_config).hidden, model_dims(context.teacher_config).hidden
            self.latent_projector = nn.Linear(d_s, d_t)  # tokenkit's projector_latents (student → teacher space)

    # ------------------------------------------------------------------------------------------ pieces
    def _end_ok(self, view: TokenView, space: torch.Tensor) -> torch.Tensor:
        """(batch, len) bool for `chunks: space`: the next label token is in the space set (or there is none)."""
        labels = view.labels
        next_labels = torch.full_like(labels, -100)
        next_labels[:, :-1] = labels[:, 1:]
        next_valid = next_labels.ne(-100)
        in_space = space[next_labels.clamp(0, space.shape[0] - 1)] & next_valid & next_labels.lt(space.shape[0])
        return torch.where(next_valid, in_space, torch.ones_like(next_valid))

    def chunk_plan(self, student: TokenView, teacher: TokenView) -> ChunkPlan:
        """Co-terminating chunks of the batch (restricted to word boundaries with `chunks: space`)."""
        s_ok = t_ok = None
        if self.options.chunks == "space":
            s_ok, t_ok = self._end_ok(student, self.student_space), self._end_ok(teacher, self.teacher_space)
        return common_chunks(student.labels, student.label_offsets, teacher.labels, teacher.label_offsets, s_ok, t_ok)

    def chunk_scores(self, plan: ChunkPlan, student: TokenView, teacher: TokenView,
                     s_label_lp: torch.Tensor, s_space_lp: torch.Tensor, s_index: torch.Tensor,
                     t_label_lp: torch.Tensor, t_space_lp: torch.Tensor, t_index: torch.Tensor) -> ChunkScores:
        """Sum token log-probs per chunk, merge by the teacher's space probability, append the space term."""
        opts = self.options
        chunks = plan.num_chunks
        s_ids = plan.student_chunk[student.label_mask]  # (K_s,) chunk of each student label row, −1: none
        t_ids = plan.teacher_chunk[teacher.label_mask]  # (K_t,)
        s_logp = _scatter_sum(s_label_lp, s_ids, chunks).clamp(max=0.0)  # (chunks,)
        t_logp = _scatter_sum(t_label_lp, t_ids, chunks).clamp(max=0.0)
        t_tokens = _scatter_sum(torch.ones_like(t_label_lp), t_ids, chunks)
        s_space = s_logp.new_zeros(chunks)  # log P(next token starts a word) after each chunk; 0 after EOS
        t_space = t_logp.new_zeros(chunks)
        if self.need_space and chunks:
            text = (~plan.is_eos).nonzero().squeeze(1)
            s_next = s_index.index_select(0, plan.student_last[text] + 1)  # label row after the chunk's last token
            t_next = t_index.index_select(0, plan.teacher_last[text] + 1)
            s_space = s_space.index_put((text,), s_space_lp.index_select(0, s_next).clamp(max=0.0))
            t_space = t_space.index_put((text,), t_space_lp.index_select(0, t_next).clamp(max=0.0))
        closes = torch.ones_like(plan.is_eos)  # (chunks,) a (merged) chunk ends here
        if opts.merge_by_space_prob:  # ... only where the teacher expects a word boundary next, and at row ends
            closes = plan.row_ends() | (t_space.detach().exp() > opts.space_threshold)
        group = closes.long().cumsum(0) - closes.long()  # (chunks,) merged chunk of each chunk
        groups = int(closes.sum())
        s_group = s_logp.new_zeros(groups).index_add(0, group, s_logp)
        t_group = t_logp.new_zeros(groups).index_add(0, group, t_logp)
        if opts.append_space:
            last = closes.nonzero().squeeze(1)  # the closing chunk of each group, in group order
            s_group = s_group + s_space[last]
            t_group = t_group + t_space[last]
        tokens = t_tokens.new_zeros(groups).index_add(0, group, t_tokens)
        return ChunkScores(plan, s_group, t_group, tokens, group)

    def latent_sum(self, inputs: DistillationInputs, plan: ChunkPlan) -> torch.Tensor:
        """Σ over text chunks of the channel-normalised squared error of hidden states after the chunk's last token."""
        text = (~plan.is_eos).nonzero().squeeze(1)
        h_s = inputs.student_out.last_hidden  # (batch, n, d_s)
        h_t = inputs.teacher_out.last_hidden  # (batch, m, d_t)
        dtype = compute_dtype(h_s)
        proj = self.latent_projector
        with no_autocast(h_s):
            # the state at the position whose input token is the chunk's last token (its label position + 1)
            s_rows = h_s.reshape(-1, h_s.shape[-1]).index_select(0, plan.student_last[text] + 1).to(dtype)
            t_rows = h_t.reshape(-1, h_t.shape[-1]).index_select(0, plan.teacher_last[text] + 1).to(dtype).detach()
            projected = F.linear(s_rows, proj.weight.to(dtype), proj.bias.to(dtype))  # (C, d_t)
            scale = t_rows.square().mean(0, keepdim=True) + LATENT_EPSILON  # (1, d_t): E_chunks[h_t²] per channel
            return ((projected - t_rows).square() / scale).mean(-1).sum()

    # -------------------------------------------------------------------------------------------- loss
    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        opts = self.options
        student, teacher = inputs.student, inputs.teacher
        s_out, t_out = inputs.student_out, inputs.teacher_out
        s_space = self.student_space if self.need_space else None
        t_space = self.teacher_space if self.need_space else None
        fused = use_fused_heads(opts.head_fusion, student.labels.device)
        s_label_lp, s_space_lp, s_index = side_label_log_probs(s_out, student, s_space, fused)
        ce = -s_label_lp.sum() / inputs.num_items
        with torch.no_grad():
            t_label_lp, t_space_lp, t_index = side_label_log_probs(t_out, teacher, t_space, fused)
        plan = self.chunk_plan(student, teacher)
        scores = self.chunk_scores(plan, student, teacher, s_label_lp, s_space_lp, s_index,
                                   t_label_lp, t_space_lp, t_index)
        per_chunk = binarised_divergence(scores.teacher_logp.detach(), scores.student_logp, opts.divergence,
                                         opts.binarization_temperature)  # (groups,)
        weights = scores.teacher_tokens if opts.chunk_weight == "teacher_tokens" else torch.ones_like(per_chunk)
        alm = (per_chunk * weights).sum() / inputs.num_items
        kd = opts.alm_weight * alm
        parts = {"ce": ce.detach(), "alm": alm.detach()}
        if self.latent_projector is not None:
            latents = self.latent_sum(inputs, plan) / inputs.num_items
            kd = kd + opts.latents_weight * latents
            parts["latents"] = latents.detach()
        loss = (1.0 - opts.kd_rate) * ce + opts.kd_rate * kd
        valid = max(1, int(student.label_mask.sum()))
        covered = int((plan.student_chunk >= 0).sum())
        stats = {"chunks_per_token": plan.num_chunks / valid, "covered_fraction": covered / valid,
                 "merged_per_token": scores.student_logp.numel() / valid}
        return LossOutput(loss, parts, stats)
