"""Text spans shared by both tokenizations and pooled token representations over them (SRA, MTA).

- `response_input_mask`: the input positions that hold a response token. The hidden state at input position i is
  the model's representation of the token *at* i, so span representations pool these (the last prompt position,
  whose label is the first response token, holds a prompt token and is left out).
- `coterminal_span_ids`: tokenizer-agnostic spans from character offsets. Walking the response, a span closes at
  every character offset where both sides end a token: the shortest pieces of text that both tokenizations cover
  with whole tokens. A side "ends a token" at offset c only where its next token starts at or after c, so two
  tokens sharing one character (a byte-level split of a multi-byte character) never leave a boundary between them.
  Tokens after the last common boundary (a side cut by `max_length`) belong to no span.
- `pool`: attention-weighted centres of mass c_k = Σ_{t∈k} w_t h_t / Σ_{t∈k} w_t and masses M_k = Σ_{t∈k} w_t, for
  any per-position unit index (spans here, words/phrases from `TokenView.units`).
- `token_weighted_mean`: the batch reduction of per-sequence terms (docs/methods.md#68-sra).

Everything is vectorised over the batch (no Python loop over sequences or tokens).
"""

from __future__ import annotations

import torch

from dwakd.interface import TokenView


def response_input_mask(view: TokenView) -> torch.Tensor:
    """(batch, length) bool: input positions whose token belongs to the response (valid label here and before)."""
    valid = view.label_mask
    previous = torch.zeros_like(valid)
    previous[:, 1:] = valid[:, :-1]
    return valid & previous


def _clean_ends(offsets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, length) bool: valid tokens after whose end the next valid token starts at or after it.

    Also True where no valid token follows.
    """
    ends = offsets[..., 1]
    next_start = torch.full_like(ends, torch.iinfo(ends.dtype).max)
    next_start[:, :-1] = offsets[:, 1:, 0]
    next_valid = torch.zeros_like(mask)
    next_valid[:, :-1] = mask[:, 1:]
    return mask & (~next_valid | (next_start >= ends))


def coterminal_span_ids(student: TokenView, teacher: TokenView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Span index of every input position on each side (−1 outside every span) and the span count per sequence.

    Returns (student (batch, n) int64, teacher (batch, m) int64, counts (batch,) int64). Span k of sequence b is the
    same text on both sides and holds at least one token of each.
    """
    s_mask, t_mask = response_input_mask(student), response_input_mask(teacher)
    s_end, t_end = student.input_offsets[..., 1], teacher.input_offsets[..., 1]
    batch = s_mask.shape[0]
    top = int(torch.cat([s_end[s_mask], t_end[t_mask], s_end.new_zeros(1)]).max())
    grid = torch.zeros(2, batch, top + 2, dtype=torch.bool, device=s_end.device)  # [side, b, char offset]
    for k, (end, clean) in enumerate(((s_end, _clean_ends(student.input_offsets, s_mask)),
                                      (t_end, _clean_ends(teacher.input_offsets, t_mask)))):
        rows = torch.arange(batch, device=end.device).unsqueeze(1).expand_as(end)
        grid[k, rows[clean], end[clean]] = True
    common = grid[0] & grid[1]  # (batch, chars): offsets where both sides end a token
    below = common.long().cumsum(1)  # below[b, c] = number of common boundaries at offsets ≤ c
    counts = below[:, -1]

    def ids(end: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        before = below.gather(1, (end - 1).clamp(0, top + 1))  # boundaries strictly before the token's end
        keep = mask & (end > 0) & (before < counts.unsqueeze(1))
        return torch.where(keep, before, torch.full_like(before, -1))

    return ids(s_end, s_mask), ids(t_end, t_mask), counts


def pool(values: torch.Tensor, weights: torch.Tensor, unit_ids: torch.Tensor,
         units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted centre of mass and mass of every unit.

    values (batch, length, d), weights (batch, length) ≥ 0, unit_ids (batch, length) int64 in [−1, units) →
    centres (batch, units, d) in at least fp32 and masses (batch, units). A unit whose tokens all weigh 0 (attention
    dropout can zero a probability) has mass 0 and the plain mean of its tokens as centre; a unit with no token
    has centre 0.
    """
    batch, _, width = values.shape
    dtype = torch.promote_types(values.dtype, torch.float32)
    keep = unit_ids.ge(0).reshape(-1)
    slot = (torch.arange(batch, device=values.device).unsqueeze(1) * units + unit_ids.clamp_min(0)).reshape(-1)
    slot, w = slot[keep], weights.reshape(-1)[keep].to(dtype)
    h = values.reshape(-1, width)[keep].to(dtype)
    mass = torch.zeros(batch * units, dtype=dtype, device=values.device).index_add(0, slot, w)
    w = torch.where(mass[slot] > 0, w, torch.ones_like(w))  # weightless unit: every token counts equally
    total = torch.zeros(batch * units, dtype=dtype, device=values.device).index_add(0, slot, w)
    sums = torch.zeros(batch * units, width, dtype=dtype, device=values.device).index_add(0, slot, h * w.unsqueeze(1))
    centres = sums / total.clamp_min(torch.finfo(dtype).tiny).unsqueeze(1)
    return centres.reshape(batch, units, width), mass.reshape(batch, units)


def token_weighted_mean(per_sequence: torch.Tensor, view: TokenView, num_items: torch.Tensor) -> torch.Tensor:
    """Σ_b (n_b / N)·value_b: per-sequence values weighted by the sequence's student label tokens n_b over the
    global count N, so a term is a weighted mean over the global batch whatever its split into micro-batches."""
    tokens = view.label_mask.sum(-1).to(per_sequence.dtype)
    return (per_sequence * tokens).sum() / num_items.to(per_sequence.dtype)


def unit_token_counts(unit_ids: torch.Tensor, units: int) -> torch.Tensor:
    """(batch, units) number of positions of each unit in a (batch, length) int64 unit index (−1: none)."""
    batch = unit_ids.shape[0]
    keep = unit_ids.ge(0).reshape(-1)
    slot = (torch.arange(batch, device=unit_ids.device).unsqueeze(1) * units + unit_ids.clamp_min(0)).reshape(-1)
    counts = torch.zeros(batch * units, dtype=torch.long, device=unit_ids.device)
    return counts.index_add(0, slot[keep], torch.ones_like(slot[keep])).reshape(batch, units)
