"""Co-terminating chunks: the shortest pieces of the response that both tokenizations cut at the same place.

Two tokenizations of the same text agree on some token *ends*: a character offset where a token ends on both
sides. Cutting the response at every such common end gives the shortest chunks that hold whole tokens on both
sides and the same text (ALM's "unconstrained" chunks, Minixhofer et al. 2025; SRA's spans). A chunk's tokens are
the *label* tokens (what each position predicts), so a chunk's log-likelihood on one side is the sum of the
log-probabilities at its label positions.

Computed from the character offsets the collator keeps (no token strings, no text), vectorised over the batch in
torch with no Python loop over tokens. Per side and row (label positions are one contiguous block, the response):
- a token may end a chunk at its end offset e when the next label token does not overlap it (its start is ≥ e)
  and ends later (> e). Tokens holding part of a multibyte character report the whole character's span, so the
  first piece overlaps the next and never ends a chunk: a chunk never splits a character. A zero-width token
  stuck to the token before it joins the following chunk;
- the last text token ends a chunk when the response is complete on that side (it ends in EOS). A side cut by
  `max_length` may have lost the rest of a character or of a token the other side merges, so its last token
  never ends a chunk and the tail after the last common end is left out on both sides;
- EOS is the final label with an empty span at the end of the text. When both sides end in EOS, the two EOS
  tokens form one more chunk of their own (the reference aligns special tokens with each other as a chunk);
- an end offset that occurs on one side at two tokens (only with malformed offsets) is dropped from that side.
Common ends are found with one `torch.isin` over (row, offset) keys. Optional per-side masks (`student_end_ok`,
`teacher_end_ok`) restrict where chunks may end (ALM's "space" chunks: only before whitespace-initial tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkPlan:
    """Chunks of a batch, numbered 0..num_chunks−1 row by row in text order; both sides share the numbering.

    `*_chunk` are on the padded grids of each side: the chunk of each label position, −1 for a position outside
    every chunk (prompt, padding, a truncated tail, an EOS without counterpart). `*_last` are flat positions
    (row·length + position) of the last label position of each chunk on that side.
    """

    student_chunk: torch.Tensor  # (batch, n) int64
    teacher_chunk: torch.Tensor  # (batch, m) int64
    student_last: torch.Tensor  # (chunks,) int64 flat positions into the (batch, n) grid
    teacher_last: torch.Tensor  # (chunks,) int64 flat positions into the (batch, m) grid
    row: torch.Tensor  # (chunks,) int64 batch row of each chunk
    end_offset: torch.Tensor  # (chunks,) int64 character offset where the chunk ends (EOS chunk: end of text)
    is_eos: torch.Tensor  # (chunks,) bool: the EOS↔EOS chunk of its row

    @property
    def num_chunks(self) -> int:
        return int(self.row.numel())

    def row_ends(self) -> torch.Tensor:
        """(chunks,) bool: the last chunk of its row."""
        last = torch.ones_like(self.is_eos)
        if self.row.numel() > 1:
            last[:-1] = self.row[1:] != self.row[:-1]
        return last


def _contiguous_block(valid: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """First label position and label count per row; raises if a row's label positions are not one block."""
    count = valid.sum(-1)  # (batch,)
    first = valid.to(torch.int8).argmax(-1)  # (batch,) 0 for rows without labels
    positions = torch.arange(valid.shape[1], device=valid.device).view(1, -1)
    block = (positions >= first.view(-1, 1)) & (positions < (first + count).view(-1, 1))
    if not torch.equal(block, valid):
        raise ValueError(f"{side}: label positions must form one contiguous block per row (the response)")
    return first, count


def _side_ends(labels: torch.Tensor, offsets: torch.Tensor, end_ok: torch.Tensor | None, side: str):
    """Per label position: may end a chunk (bool), is the final EOS (bool), end offset; row has EOS (batch,)."""
    valid = labels.ne(-100)  # (batch, L)
    first, count = _contiguous_block(valid, side)
    start, end = offsets[..., 0].long(), offsets[..., 1].long()  # (batch, L)
    positions = torch.arange(labels.shape[1], device=labels.device).view(1, -1)
    last = (first + count - 1).view(-1, 1)
    is_eos = valid & (positions == last) & (start == end)  # (batch, L): EOS has the empty span at the text end
    has_eos = is_eos.any(-1)  # (batch,)
    text = valid & ~is_eos
    next_start = torch.full_like(start, -1)
    next_end = torch.full_like(end, -1)
    next_start[:, :-1], next_end[:, :-1] = start[:, 1:], end[:, 1:]
    last_text = text & (positions == (last - has_eos.long().view(-1, 1)))
    inner_end = (next_start >= end) & (next_end > end) & ~last_text  # the next token starts after this one ends
    can_end = text & (inner_end | (last_text & has_eos.view(-1, 1)))
    if end_ok is not None:
        can_end &= end_ok.to(torch.bool)
    return can_end, is_eos, end, has_eos, text


def _drop_duplicate_keys(key: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """`ok` without keys that occur more than once among the ok positions."""
    uniq, counts = torch.unique(key[ok], return_counts=True)
    dup = uniq[counts > 1]
    return ok & ~torch.isin(key, dup) if dup.numel() else ok


def common_chunks(
    student_labels: torch.Tensor,
    student_label_offsets: torch.Tensor,
    teacher_labels: torch.Tensor,
    teacher_label_offsets: torch.Tensor,
    student_end_ok: torch.Tensor | None = None,
    teacher_end_ok: torch.Tensor | None = None,
) -> ChunkPlan:
    """Cut both sides' response label tokens at every end offset they share (see the module docstring).

    Labels are (batch, len) with −100 off the response; offsets (batch, len, 2) are the label tokens' character
    spans into prompt + response (`TokenView.labels` / `TokenView.label_offsets`). `*_end_ok` (batch, len) bool, if
    given, says where a chunk may end on that side.
    """
    if student_labels.shape[0] != teacher_labels.shape[0]:
        raise ValueError(f"batch sizes differ: {student_labels.shape[0]} vs {teacher_labels.shape[0]}")
    s_can, s_eos, s_end, s_has_eos, s_text = _side_ends(student_labels, student_label_offsets, student_end_ok,
                                                        "student")
    t_can, t_eos, t_end, t_has_eos, t_text = _side_ends(teacher_labels, teacher_label_offsets, teacher_end_ok,
                                                        "teacher")
    device = student_labels.device
    width = int(max(int(s_end.max()) if s_end.numel() else 0, int(t_end.max()) if t_end.numel() else 0)) + 2
    rows_s = torch.arange(s_end.shape[0], device=device).view(-1, 1)
    s_key = rows_s * width + s_end.clamp_min(0)  # (batch, n)
    t_key = rows_s * width + t_end.clamp_min(0)  # (batch, m)
    s_can = _drop_duplicate_keys(s_key, s_can)
    t_can = _drop_duplicate_keys(t_key, t_can)
    s_cut = s_can & torch.isin(s_key, t_key[t_can])  # (batch, n): ends a chunk
    t_cut = t_can & torch.isin(t_key, s_key[s_can])
    cuts = s_cut.sum(-1)  # (batch,) text chunks per row, equal on both sides
    eos_chunk = s_has_eos & t_has_eos  # (batch,)
    per_row = cuts + eos_chunk.long()
    row_offset = per_row.cumsum(0) - per_row  # (batch,)

    def assign(cut: torch.Tensor, text: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        local = cut.long().cumsum(-1) - cut.long()  # chunks closed before each position
        inside = text & (local < cuts.view(-1, 1))
        chunk = torch.where(inside, local + row_offset.view(-1, 1), torch.full_like(local, -1))
        eos_id = (row_offset + cuts).view(-1, 1).expand_as(chunk)
        return torch.where(eos & eos_chunk.view(-1, 1), eos_id, chunk)

    s_chunk = assign(s_cut, s_text, s_eos)
    t_chunk = assign(t_cut, t_text, t_eos)
    total = int(per_row.sum())

    def last_positions(chunk: torch.Tensor, closes: torch.Tensor) -> torch.Tensor:
        flat_chunk = chunk.reshape(-1)
        closes = closes.reshape(-1)
        out = torch.empty(total, dtype=torch.long, device=device)
        where = closes.nonzero().squeeze(1)
        out[flat_chunk[where]] = where
        return out

    s_last = last_positions(s_chunk, s_cut | (s_eos & eos_chunk.view(-1, 1)))
    t_last = last_positions(t_chunk, t_cut | (t_eos & eos_chunk.view(-1, 1)))
    n = student_labels.shape[1]
    row = torch.div(s_last, n, rounding_mode="floor")
    end_offset = s_end.reshape(-1)[s_last]
    is_eos = s_eos.reshape(-1)[s_last]
    return ChunkPlan(s_chunk, t_chunk, s_last, t_last, row, end_offset, is_eos)
