"""SRA: Span Representation Alignment (Dao, Nguyen, Chi et al. 2026, arXiv 2605.01205).

Distils representations of text spans that both tokenizations cover with whole tokens instead of single tokens.
Per micro-batch (docs/methods.md#68-sra):

1. Spans (`dwakd.modules.spans.coterminal_span_ids`): over the response's input tokens, a span closes at every
   character offset where both sides end a token.
2. Centre of mass at a layer ℓ of each side: token weights w_t from that model's own layer-ℓ attention (heads
   summed, the row of the last non-padding position, normalised; no gradient); c_k = Σ_{t∈k} w_t h_t^ℓ / Σ_{t∈k} w_t.
   Saliency of span k from the teacher: ŵ_k = M_k^p / Σ_l M_l^p with M_k = Σ_{t∈k} w_t^T (p = `saliency_power`).
3. Span alignment per layer pair (s, t): L_span^ℓ = Σ_k ŵ_k (1 − cos(P_ℓ c^s_k, c^t_k)) with a projector
   P_ℓ = Linear(d_s → d_t, no bias); L_span = Σ_ℓ λ_ℓ L_span^ℓ, λ = `layer_weights` normalised to sum 1.
4. Geometric regulariser at the last pair, unprojected: L_geo = Σ_{k≠l} π_kl (cos(c^s_k, c^s_l) − cos(c^t_k, c^t_l))²
   with π_kl ∝ ŵ_k ŵ_l.
5. Span logits at the last pair: z_k = head(c_k) on each side, restricted to the shared vocabulary (tokens whose
   decoded text is identical); L_logit = mean_k D(softmax(z^t_k/τ) → softmax(z^s_k/τ)) (D = `kd_objective`, fkl).

    KD   = span_weight·L_span + geo_weight·L_geo + logit_weight·L_logit
    loss = (1 − kd_rate)·CE/N + kd_rate·KD

Span-level terms are means over the spans of a sequence (the ŵ-weighted means of steps 3–4, the plain mean of
step 5), averaged over the global batch with weight n_b/N per sequence (n_b its student label tokens): a
weighted mean whatever the split into micro-batches and ranks (`token_weighted_mean`).

Only the abstract is published; the choices below follow the public code sonho4ng/SRAv4 (provenance unverified)
unless marked *ours*:
- spans from co-terminating character offsets, starting at the first response token (SRAv4's
  `longest_common_subsequence` over offset ends); *ours*: an offset counts as a token end on a side only when the
  next token starts at or after it, and no cap on the number of spans (SRAv4 subsamples above 1024);
- attention weights, saliency ŵ with power p = 1, the projected cosine span loss, the unprojected geometric
  regulariser with pair weights from the teacher's saliency at the last pair, logits from the last pair's centres:
  SRAv4 (`utils.get_span_hidden_states`, `llm_train.knowledge_distillation_loss`);
- weights 2 / 10 / 1, α = kd_rate = 0.5, τ = 2, λ uniform, projectors without bias initialised Xavier-uniform:
  SRAv4's TinyLlama script (`mistral_tinyllama.sh`: geom 10, hidden_loss_weights 1 1 1, orthogonal False);
- default layer pairs: the last 3 layers at stride 2 on each side (SRAv4's script: TinyLlama 18, 20, 22 ↔ Mistral
  28, 30, 32); *ours* for other pairs (e.g. GPT2-120M ↔ Qwen1.5-1.8B: 8, 10, 12 ↔ 20, 22, 24);
- *ours*: the centre of mass divides by the exact span mass (SRAv4 clamps it at 1e-5, which shrinks spans that get
  little attention towards 0 and only changes the logit term); the shared vocabulary compares decoded bytes
  (SRAv4 compares raw vocabulary strings, which share almost nothing between "Ġ" and "▁" tokenizers);
- *ours*: L_logit is a mean over spans; SRAv4 sums over spans (÷ batch size), i.e. its logit weight is about the
  number of spans per answer (~100 on Dolly) times ours; L_span and L_geo have the reference's scale;
- SRAv5's "derivative" loss is not in the abstract and not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dwakd.alignment import exact_text_map, token_table
from dwakd.methods.base import (
    DistillationInputs,
    DistillationMethod,
    LossOutput,
    MethodContext,
    MethodOptions,
    OptionError,
    check_choice,
    check_positive,
)
from dwakd.methods.registry import register_method
from dwakd.modules.cross_attention import project
from dwakd.modules.cross_entropy import student_cross_entropy_sum
from dwakd.modules.divergences import check_divergence, divergence, resolve_divergence
from dwakd.modules.head_fusion import HEAD_FUSIONS
from dwakd.modules.layers import check_layer_pairs, check_pairs_fit, layer_width, num_layers, top_pairs
from dwakd.modules.relational import last_token_attention, structure_loss, weighted_cosine_distance
from dwakd.modules.spans import coterminal_span_ids, pool, token_weighted_mean


@dataclass
class SRAOptions(MethodOptions):
    """SRA's options; kd_rate is the weight of KD (CE gets 1 − kd_rate), kd_temperature the τ of L_logit."""

    kd_objective: str = "fkl"  # divergence of L_logit (docs/methods.md#3-kl-family-divergences)
    layer_pairs: list[list[int]] | None = None  # [[student_layer, teacher_layer], ...]; None: last 3 at stride 2
    num_layer_pairs: int = 3  # pairs of the default map
    layer_weights: list[float] | None = None  # λ per pair (normalised to sum 1); None: uniform
    span_weight: float = 2.0
    geo_weight: float = 10.0
    logit_weight: float = 1.0
    saliency_power: float = 1.0  # p in ŵ_k ∝ M_k^p
    attention_weighting: bool = True  # false: plain token means and uniform span weights (no attentions needed)
    # the student CE: fused LM head + CE, no (rows × V) logits | dense: F.linear logits
    # | auto: fused on a GPU or under bf16 autocast, else dense
    head_fusion: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_divergence("kd_objective", self.kd_objective)
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)
        pairs = check_layer_pairs("layer_pairs", self.layer_pairs, lowest=1)
        self.layer_pairs = None if pairs is None else [list(p) for p in pairs]
        if (not isinstance(self.num_layer_pairs, int) or isinstance(self.num_layer_pairs, bool)
                or self.num_layer_pairs < 1):
            raise OptionError("num_layer_pairs", f"must be a positive integer; got {self.num_layer_pairs!r}")
        if self.layer_weights is not None:
            ok = isinstance(self.layer_weights, (list, tuple)) and self.layer_weights and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in self.layer_weights)
            if not ok or sum(self.layer_weights) <= 0:
                raise OptionError("layer_weights", f"must be a list of numbers ≥ 0 with a positive sum; "
                                                   f"got {self.layer_weights!r}")
            if pairs is not None and len(self.layer_weights) != len(pairs):
                raise OptionError("layer_weights", f"needs one weight per layer pair ({len(pairs)}); "
                                                   f"got {len(self.layer_weights)}")
        for name in ("span_weight", "geo_weight", "logit_weight"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_positive("saliency_power", self.saliency_power, allow_zero=True)
        if not isinstance(self.attention_weighting, bool):
            raise OptionError("attention_weighting", f"must be true or false; got {self.attention_weighting!r}")


@register_method
class SRA(DistillationMethod):
    """Span centres of mass aligned through projectors, a geometric regulariser, and span-level logit KD."""

    name = "sra"
    title = "SRA"
    teacher_cache_refusal = ("it reads the teacher's hidden states (and attentions) at every span of prompt and "
                             "response, and a cache holds response rows only")
    Options = SRAOptions
    needs_teacher = True
    needs_hidden_states = True
    needs_attentions = True

    def __init__(self, options: SRAOptions, context: MethodContext):
        super().__init__(options, context)
        if context.teacher_config is None:
            raise ValueError(f"method {self.name!r} needs a teacher: set `teacher:` in the config")
        self.needs_attentions = options.attention_weighting
        self.kd_objective = resolve_divergence(options.kd_objective)
        depth_s, depth_t = num_layers(context.student_config), num_layers(context.teacher_config)
        pairs = ([tuple(p) for p in options.layer_pairs] if options.layer_pairs is not None
                 else top_pairs(depth_s, depth_t, options.num_layer_pairs, stride=2))
        check_pairs_fit("layer_pairs", pairs, depth_s, depth_t)
        weights = options.layer_weights if options.layer_weights is not None else [1.0] * len(pairs)
        if len(weights) != len(pairs):
            raise OptionError("layer_weights", f"needs one weight per layer pair; the default map has {len(pairs)} "
                                               f"pairs {pairs}, got {len(weights)} weights")
        self.layer_pairs = pairs
        self.layer_lambdas = [w / sum(weights) for w in weights]
        self.projectors = nn.ModuleList()
        for s, t in pairs:
            layer = nn.Linear(layer_width(context.student_config, s), layer_width(context.teacher_config, t),
                              bias=False)
            nn.init.xavier_uniform_(layer.weight)
            self.projectors.append(layer)
        self.uses_logits = options.logit_weight > 0
        if self.uses_logits:
            self._shared_vocabulary(context)

    def _shared_vocabulary(self, context: MethodContext) -> None:
        """Teacher and student ids whose decoded text is identical (EOS ↔ EOS) — the columns of the span logits."""
        if context.student_tokenizer is None or context.teacher_tokenizer is None:
            raise ValueError(f"method {self.name!r}: the span-logit term needs both tokenizers in the MethodContext "
                             "(or set logit_weight: 0)")
        exact = exact_text_map(token_table(context.teacher_tokenizer), token_table(context.student_tokenizer))
        teacher_ids = np.nonzero(exact >= 0)[0]
        if len(teacher_ids) == 0:
            raise ValueError(f"method {self.name!r}: the two vocabularies share no token text; set logit_weight: 0")
        self.register_buffer("shared_teacher_ids", torch.from_numpy(teacher_ids), persistent=False)
        self.register_buffer("shared_student_ids", torch.from_numpy(exact[teacher_ids]), persistent=False)

    # ---- pieces ------------------------------------------------------------------------------------------------
    def token_weights(self, out, layer: int, view) -> torch.Tensor:
        """(batch, length) w_t at `layer` from the model's own attention (or 1 at every non-padding position)."""
        if not self.options.attention_weighting:
            return view.attention_mask.float()
        if not out.attentions:
            raise RuntimeError(f"method {self.name!r} reads attention probabilities: run the models with "
                               "output_attentions=True and eager attention (the trainer does this)")
        return last_token_attention(out.attentions[layer - 1], view.attention_mask)

    def span_logits(self, out, centres: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """(spans, shared) the model's LM head applied to span centres, on the shared vocabulary only."""
        head = out.model.get_output_embeddings()
        weight = head.weight.index_select(0, shared.to(head.weight.device))
        bias = getattr(head, "bias", None)
        bias = None if bias is None else bias.index_select(0, shared.to(bias.device))
        return nn.functional.linear(centres.to(weight.dtype), weight, bias)

    # ---- loss ----------------------------------------------------------------------------------------------------
    def compute_loss(self, inputs: DistillationInputs) -> LossOutput:
        opts: SRAOptions = self.options
        student, teacher = inputs.student, inputs.teacher
        s_out, t_out = inputs.student_out, inputs.teacher_out
        if teacher is None or t_out is None:
            raise ValueError(f"method {self.name!r} needs the teacher's view and outputs in the batch")
        n = inputs.num_items
        ce = student_cross_entropy_sum(s_out, student, opts.head_fusion) / n  # the only full-vocabulary term

        s_ids, t_ids, counts = coterminal_span_ids(student, teacher)  # (batch, n), (batch, m), (batch,)
        spans = int(counts.max()) if counts.numel() else 0
        unit_mask = torch.arange(spans, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)  # (batch, spans)
        device = s_out.last_hidden.device
        with torch.autocast(device_type=device.type, enabled=False):
            span_loss = torch.zeros((), device=device)
            for (s_layer, t_layer), projector, lam in zip(self.layer_pairs, self.projectors, self.layer_lambdas):
                c_s, _ = pool(s_out.hidden_states[s_layer], self.token_weights(s_out, s_layer, student), s_ids, spans)
                c_t, mass_t = pool(t_out.hidden_states[t_layer].detach(), self.token_weights(t_out, t_layer, teacher),
                                   t_ids, spans)  # (batch, spans, d)
                saliency = mass_t ** opts.saliency_power if opts.attention_weighting else torch.ones_like(mass_t)
                per_seq = weighted_cosine_distance(project(projector, c_s), c_t, saliency, unit_mask)  # (batch,)
                span_loss = span_loss + lam * token_weighted_mean(per_seq, student, n)
            # the last pair's centres (c_s, c_t) and saliency feed the geometric and the logit terms
            geo = token_weighted_mean(structure_loss(c_s, c_t, saliency, unit_mask), student, n)
            logit = torch.zeros((), device=device)
            if self.uses_logits:
                z_s = self.span_logits(s_out, c_s[unit_mask], self.shared_student_ids)  # (U, shared)
                with torch.no_grad():
                    z_t = self.span_logits(t_out, c_t[unit_mask], self.shared_teacher_ids)
                per_span = divergence(z_s, z_t, self.kd_objective, opts.kd_temperature)  # (U,)
                owner = torch.arange(unit_mask.shape[0], device=device).unsqueeze(1).expand_as(unit_mask)[unit_mask]
                per_seq = torch.zeros(unit_mask.shape[0], dtype=per_span.dtype, device=device).index_add(
                    0, owner, per_span) / counts.clamp_min(1).to(per_span.dtype)
                logit = token_weighted_mean(per_seq, student, n)
        kd = opts.span_weight * span_loss + opts.geo_weight * geo + opts.logit_weight * logit
        loss = (1.0 - opts.kd_rate) * ce + opts.kd_rate * kd
        parts = {"ce": ce, "span": span_loss, "geo": geo, "logit": logit, "kd": kd}
        stats = {"spans_per_sequence": counts.float().mean()}
        return LossOutput(loss, {k: v.detach() for k, v in parts.items()}, stats)
