"""DWA-KD's additions to a dual-space KD method, in one component (docs/methods.md#5-dwa-kd).

DWA-KD = a dual-space KD host (`dskd`: DSKD-CMA, or `dskdv2`) + this component:

- token level: entropy/confidence weights in both spaces replace the host's t2s mask and scale its KD terms,
      w_i = Ĥ_s(i)·g_i  (student space; g_i = peak probability of the projected teacher, the gate),
      u_j = 1 − Ĥ_t(j)   (teacher space),
  each computed without gradient at τ = 1 on the real vocabulary and rescaled per sequence to sum to the
  sequence's count of rows (`dwakd.modules.token_weights`);
- sequence level: Soft-DTW divergences over the response positions between the student's final hidden states and
  the host's projected teacher states, and between the student's target embeddings (which keep their gradient)
  and P_emb(teacher target embeddings), the cross term banded by the host's alignment (`dwakd.modules.dtw`);
- the loss weights λ_ce, λ_kd, λ_dtw and the γ schedule of Soft-DTW.

The host supplies what differs between hosts: the divergence rows and logits (`DualSpaceTerms`), the teacher
sequence in student space for the hidden-state term, and the attention the band is read from.

`DWAOptions` lists every knob once; `with_dwa_options(HostOptions)` makes the options dataclass of a DWA-KD method
from its host's (one parent, DWA fields appended), so `dwakd` and `dwakdv2` accept exactly the same DWA knobs.

Options that reproduce the public reference code (voluyen/dwa_mta, `code/criterions/dwa_kd.py`; provenance
unverified) where it departs from the paper — used together by the `dwakd-ref` preset:
`gate_after_rescale` (the code rescales the entropy alone and multiplies by the gate afterwards), `gamma_steps`
(the code anneals γ over a fixed 3,570 steps), `dtw_hidden_input: raw` (the code projects the raw teacher states,
not h_t / std(h_t)), and two host options: `kd_warmup_steps` (the code ramps the gate of t2s_kd linearly over 300
steps) and `kd_objective: srkl` (the code's scripts). Not reproduced, because they are defects rather than
choices: its Soft-DTW slices sequences from position 0 and so covers the prompt, and its teacher entropy is taken
over the head's padding rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dwakd.interface import DistillationInputs, TokenView
from dwakd.modules.cross_attention import lookup, project
from dwakd.modules.divergences import compute_dtype
from dwakd.modules.dtw import grid_dtw_divergence, response_grid, response_lengths
from dwakd.modules.dual_space import DualSpaceTerms
from dwakd.modules.projectors import ModelDims
from dwakd.modules.recompute import recompute_in_backward
from dwakd.modules.rows import valid_rows
from dwakd.modules.token_weights import (
    peak_probability,
    student_token_weights,
    teacher_token_weights,
    weights_at_rows,
)
from dwakd.ops.soft_dtw.functional import IMPLS
from dwakd.options import OptionError, check_choice, check_positive, check_range, check_steps

DTW_MODES = ("off", "plain", "banded")
DTW_LAYERS = ("hidden", "embedding")
GAMMA_SCHEDULES = ("linear", "constant")
DTW_HIDDEN_INPUTS = ("normalized", "raw")


@dataclass
class DWAOptions:
    """Every DWA-KD knob; defaults are the paper's full method."""

    token_weights: bool = True  # dual-space entropy weights; False: the host's own mask, unweighted s2t
    gate: bool = True  # g_i = peak teacher confidence in student space; False: g_i ≡ 1 ("w/o gate")
    gate_after_rescale: bool = False  # reference code: w_i = rescale(Ĥ_s)·g_i instead of rescale(Ĥ_s·g_i)
    dtw: str = "banded"  # off | plain | banded
    dtw_layers: Sequence[str] = ("hidden", "embedding")  # which sequences get a Soft-DTW term
    dtw_hidden_input: str = "normalized"  # teacher states of the hidden term: h_t / std(h_t), or raw (reference)
    dtw_recompute: bool = True  # where the host can: terms before the vocabulary ones, recomputed in backward
    band_base: float = 5.0  # base band half-width, in tokens
    band_sensitivity: float = 2.0  # κ: width grows by κ·(attention entropy)
    band_blend: float = 0.7  # β: centre = β·soft centre + (1 − β)·linear diagonal
    band_penalty: float = 1.0  # ρ: cost added outside the band
    gamma: float = 2.0  # Soft-DTW γ (start value when annealed)
    gamma_end: float = 0.8  # γ at the end of the schedule (linear)
    gamma_schedule: str = "linear"  # linear | constant
    gamma_steps: int | None = None  # length of the linear schedule in optimizer steps; None: the whole run
    ce_weight: float | None = None  # λ_ce; None: 1 − kd_rate
    kd_weight: float | None = None  # λ_kd; None: kd_rate
    dtw_weight: float = 0.2  # λ_dtw
    dtw_impl: str = "auto"  # Soft-DTW backend passed to dwakd.ops.soft_dtw


def validate_dwa_options(options: DWAOptions) -> None:
    """Check and normalise the DWA fields of any options object that has them (raises OptionError)."""
    check_choice("dtw", options.dtw, DTW_MODES)
    layers = (options.dtw_layers,) if isinstance(options.dtw_layers, str) else options.dtw_layers
    if not isinstance(layers, Sequence) or not layers:
        raise OptionError("dtw_layers", f"must be a non-empty list of {', '.join(DTW_LAYERS)}; got {layers!r}")
    for layer in layers:
        check_choice("dtw_layers", layer, DTW_LAYERS)
    options.dtw_layers = tuple(dict.fromkeys(layers))
    check_choice("dtw_hidden_input", options.dtw_hidden_input, DTW_HIDDEN_INPUTS)
    check_choice("gamma_schedule", options.gamma_schedule, GAMMA_SCHEDULES)
    check_choice("dtw_impl", options.dtw_impl, IMPLS)
    for name in ("token_weights", "gate", "gate_after_rescale", "dtw_recompute"):
        if not isinstance(getattr(options, name), bool):
            raise OptionError(name, f"must be true or false; got {getattr(options, name)!r}")
    check_positive("gamma", options.gamma)
    check_positive("gamma_end", options.gamma_end)
    for name in ("band_base", "band_sensitivity", "band_penalty", "dtw_weight"):
        check_positive(name, getattr(options, name), allow_zero=True)
    check_range("band_blend", options.band_blend, 0.0, 1.0)
    for name in ("ce_weight", "kd_weight"):
        if getattr(options, name) is not None:
            check_positive(name, getattr(options, name), allow_zero=True)
    if options.gamma_steps is not None:
        check_steps("gamma_steps", options.gamma_steps)


def with_dwa_options(host: type, name: str) -> type:
    """The options dataclass of a DWA-KD method: `host`'s fields, then every `DWAOptions` field, validated by both."""

    def __post_init__(self) -> None:
        host.__post_init__(self)
        validate_dwa_options(self)

    extra = [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(DWAOptions)]
    doc = f"{host.__name__}'s options plus DWA-KD's (`dwakd.modules.dwa.DWAOptions`)."
    return dataclasses.make_dataclass(name, extra, bases=(host,),
                                      namespace={"__post_init__": __post_init__, "__doc__": doc})


class DWAComponent(nn.Module):
    """DWA-KD's token weights, Soft-DTW terms, loss weights and γ schedule, for any dual-space host.

    Owns P_emb (Linear(e_t → e_s)) when the embedding Soft-DTW term is on. Build it after the host's projectors:
    parameters are created in a fixed order, so DWA-KD and its host start from the same projector weights.
    """

    def __init__(self, options: DWAOptions, student: ModelDims, teacher: ModelDims):
        super().__init__()
        self.options = options
        self.embedding = nn.Linear(teacher.embedding, student.embedding) if "embedding" in self.dtw_layers() else None

    def dtw_layers(self) -> tuple[str, ...]:
        """The sequences that get a Soft-DTW term (empty when DTW is off)."""
        return () if self.options.dtw == "off" else tuple(self.options.dtw_layers)

    def loss_weights(self, kd_rate: float) -> tuple[float, float]:
        """(λ_ce, λ_kd); unset ones follow the host's kd_rate: (1 − kd_rate, kd_rate)."""
        opts = self.options
        w_ce = 1.0 - kd_rate if opts.ce_weight is None else opts.ce_weight
        w_kd = kd_rate if opts.kd_weight is None else opts.kd_weight
        return w_ce, w_kd

    def gamma_at(self, progress: float, step: int = 0) -> float:
        """Soft-DTW γ: linear from `gamma` to `gamma_end` over the run (or over `gamma_steps`), or constant."""
        opts = self.options
        if opts.gamma_schedule == "constant":
            return float(opts.gamma)
        t = min(1.0, (step + 1) / opts.gamma_steps) if opts.gamma_steps else min(1.0, max(0.0, float(progress)))
        return float(opts.gamma + (opts.gamma_end - opts.gamma) * t)

    def kd_scales(self, terms: DualSpaceTerms) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) weights w_i for t2s_div and (Q,) weights u_j for s2t_div, in the order of the terms' rows."""
        opts = self.options
        s_mask, t_mask = terms.student_mask, terms.teacher_mask
        gate = None
        if opts.gate:  # (P,) in student_rows order
            gate = terms.t2s_peak if terms.t2s_peak is not None else peak_probability(terms.t2s_logits.detach())
        inner_gate = None if opts.gate_after_rescale else gate
        if terms.student_entropy is not None:  # per-row entropies from the host's KD pass (fused head, or CPU fkl)
            raw = terms.student_entropy / math.log(terms.student_vocab)
            raw = raw if inner_gate is None else raw * inner_gate.to(raw.dtype)
            w = weights_at_rows(raw, s_mask, terms.student_rows)
        else:
            s_rows = None if terms.student_index is None else terms.student_index.index_select(0, valid_rows(s_mask))
            w = student_token_weights(terms.student_logits, s_mask, terms.student_vocab, inner_gate, rows=s_rows)
        if terms.teacher_entropy is not None:
            confidence = (1.0 - terms.teacher_entropy / math.log(terms.teacher_vocab)).clamp_min(0.0)
            u = weights_at_rows(confidence, t_mask, terms.teacher_rows)
        else:
            t_rows = None if terms.teacher_index is None else terms.teacher_index.index_select(0, valid_rows(t_mask))
            u = teacher_token_weights(terms.teacher_logits, t_mask, terms.teacher_vocab, rows=t_rows)
        student_scale = w.weights.reshape(-1).index_select(0, terms.student_rows)  # (P,)
        teacher_scale = u.weights.reshape(-1).index_select(0, terms.teacher_rows)  # (Q,)
        if gate is not None and opts.gate_after_rescale:
            student_scale = student_scale * gate.to(student_scale.dtype)
        with torch.no_grad():
            count = max(1, terms.student_rows.numel())
            terms.stats["student_weight_mean"] = w.raw.sum() / count
            terms.stats["teacher_weight_mean"] = u.raw.sum() / max(1, terms.teacher_rows.numel())
            if gate is not None:
                terms.stats["gate_mean"] = gate.sum() / count
        return student_scale, teacher_scale

    def student_sequences(self, inputs: DistillationInputs) -> dict[str, torch.Tensor]:
        """The student side of each enabled Soft-DTW term: layer -> (batch, n, ·) sequence, with its gradient.

        Hosts call this before their vocabulary-sized terms. Autograd runs backward nodes newest first, so a lookup
        made here gets its backward (the embedding table's dense (V, e_s) gradient) after the backward of those
        terms, the step's memory peak; made after them, that gradient is allocated first and lives through the
        peak (+12.3 MiB on the tiny recipe, 1.0 % of the step's peak).
        """
        return self._student_sequences(inputs.student_out.last_hidden, inputs.student_out.input_embeddings(),
                                       inputs.student)

    def _student_sequences(self, last_hidden: torch.Tensor, table: nn.Module, student: TokenView
                           ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for layer in self.dtw_layers():
            if layer == "hidden":
                out[layer] = last_hidden  # (batch, n, d_s)
            else:  # target embeddings keep their gradient: the embedding table learns from this term
                out[layer] = lookup(table, student.labels, student.label_mask)  # (batch, n, e_s)
        return out

    def dtw_sums(
        self,
        inputs: DistillationInputs,
        student_seqs: dict[str, torch.Tensor],
        teacher_hidden: Callable[[], torch.Tensor],
        attention: torch.Tensor | None,
        gamma: float,
    ) -> dict[str, torch.Tensor]:
        """Soft-DTW divergence summed over the batch per enabled layer: {"dtw_hidden": …, "dtw_embedding": …}.

        `student_seqs` is `student_sequences(inputs)`, made by the host before its vocabulary-sized terms;
        `teacher_hidden()` gives the host's (batch, m, d_s) teacher sequence in student space (called only when the
        hidden term is on); `attention` (batch, n, m) is the band source, None for an unbanded cross term.
        """
        return self._dtw_sums(inputs.student, inputs.teacher, inputs.teacher_out.input_embeddings(), student_seqs,
                              teacher_hidden, attention, gamma, response_lengths(inputs.student.label_mask,
                                                                                 inputs.teacher.label_mask))

    def dtw_loss(self, sums: dict[str, torch.Tensor], num_items: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(λ_dtw · Σ_layers D_layer / num_items, {"dtw_<layer>": D_layer / num_items}) from `dtw_sums`' sums."""
        parts = {name: value / num_items for name, value in sums.items()}
        return self.options.dtw_weight * sum(parts.values()), parts

    def recomputed_dtw_loss(
        self,
        inputs: DistillationInputs,
        teacher_source: torch.Tensor,
        teacher_hidden: Callable[[torch.Tensor], torch.Tensor],
        teacher_modules: Sequence[nn.Module],
        attention: torch.Tensor | None,
        gamma: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`dtw_loss(dtw_sums(...))` (to rounding), built by a host *before* its vocabulary-sized terms and recomputed
        in backward.

        Autograd runs backward nodes newest first. Built after the vocabulary terms (`dtw_sums`), the Soft-DTW
        terms' backward runs first and its gradients (w.r.t. the student sequences and the projector weights) live
        through the backward of those terms, the step's memory peak; built before them with their graph, their
        saved tensors (and the kernels' alignment matrices) would. Here they run once without a graph (values only)
        and again in backward (`dwakd.modules.recompute`), which then comes after the vocabulary terms': all they
        keep is the region's inputs — the student's last hidden state, `teacher_source` and `attention` — which a
        host passes only where its own graph saves those very tensors (DSKD-CMA: the s2t projector saves the
        student states, the t2s projector its value input, the attention product the attention), so the terms add
        no memory at the peak; the price is their forward once more, without the alignment matrices.

        The loss weight and 1/`num_items` scale the sums inside the region (one scalar of the sums' dtype kept),
        so its one output is the term the host adds last to its loss: the gradient waiting at the region through
        the vocabulary terms' backward is then the loss's own incoming gradient, not a scalar made for it; the
        parts are the values-only run's sums over `num_items`, without a graph.
        `teacher_hidden(teacher_source)` gives the (batch, m, d_s) teacher sequence in student space from the
        parameters of `teacher_modules` (it may keep nothing but modules and label tensors in its closure); the
        embedding tables, label tensors and P_emb are read from `inputs`.
        """
        # what the region's closure keeps until backward: never `inputs` itself (it holds both models' outputs)
        student, teacher = inputs.student, inputs.teacher
        s_table, t_table = inputs.student_out.input_embeddings(), inputs.teacher_out.input_embeddings()
        lengths = response_lengths(student.label_mask, teacher.label_mask)
        layers = self.dtw_layers()
        modules = [*(teacher_modules if "hidden" in layers else ()),
                   *((self.embedding, s_table) if "embedding" in layers else ())]
        num_items = inputs.num_items
        scale = self.options.dtw_weight / num_items.to(compute_dtype(inputs.student_out.last_hidden))
        sums: dict[str, torch.Tensor] = {}
        forward = True  # the first run (values only, or the only run when nothing needs a gradient) logs its sums

        def region(hidden: torch.Tensor, source: torch.Tensor, attn: torch.Tensor | None) -> list[torch.Tensor]:
            seqs = self._student_sequences(hidden, s_table, student)
            made = self._dtw_sums(student, teacher, t_table, seqs, lambda: teacher_hidden(source), attn, gamma,
                                  lengths)
            if forward:
                sums.update({name: value.detach() for name, value in made.items()})
            return [scale * sum(made.values())]

        def params() -> list[torch.Tensor]:
            return [p for module in modules for p in module.parameters() if p.requires_grad]

        (term,) = recompute_in_backward(region, (inputs.student_out.last_hidden, teacher_source, attention), params)
        forward = False
        parts = {name: value / num_items for name, value in sums.items()}
        sums.clear()  # the closure lives until the region's backward: it keeps no tensor of the forward
        return term, parts

    def _dtw_sums(
        self,
        student: TokenView,
        teacher: TokenView,
        teacher_table: nn.Module,
        student_seqs: dict[str, torch.Tensor],
        teacher_hidden: Callable[[], torch.Tensor],
        attention: torch.Tensor | None,
        gamma: float,
        lengths: tuple[list[int], list[int]],
    ) -> dict[str, torch.Tensor]:
        """`dtw_sums` on explicit pieces; `lengths` = `response_lengths(m_s, m_t)`, the one device-to-host read of
        the Soft-DTW terms (made once per step by the callers, and reused by a recompute)."""
        opts = self.options
        m_t = teacher.label_mask  # whole responses
        # one compaction plan and one band for both layers (same masks, same attention)
        grid = response_grid(student.label_mask, m_t, lengths, attention, opts.band_base, opts.band_sensitivity,
                             opts.band_blend, opts.band_penalty)
        out: dict[str, torch.Tensor] = {}
        for layer in self.dtw_layers():
            student_seq = student_seqs[layer]
            if layer == "hidden":
                teacher_seq = teacher_hidden()  # (batch, m, d_s)
            else:
                with torch.no_grad():
                    teacher_emb = lookup(teacher_table, teacher.labels, m_t)
                teacher_seq = project(self.embedding, teacher_emb.detach())  # (batch, m, e_s)
            per_sequence = grid_dtw_divergence(student_seq, teacher_seq, grid, gamma, opts.dtw_impl)
            out[f"dtw_{layer}"] = per_sequence.sum()
        return out
