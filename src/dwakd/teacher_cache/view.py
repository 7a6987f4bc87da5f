"""The teacher as methods see it when it comes from a cache: a `ModelView` backed by cached rows, and a module that
holds only the teacher's embedding table and LM head (its transformer blocks are never built).

Methods receive the same `ModelView` API as with a live teacher (docs/teacher-cache.md#what-methods-see):
- `logits_at(rows)` / `label_logits(view)` at the teacher's label positions (the response positions; the only rows
  any built-in method reads). Lossless cache: the stored logits, bit for bit. Top-k cache: a dense row materialised
  at the rows asked for — the k cached log-probabilities at their token ids, and every other real token shifted so
  that the tail's probability mass at the calibration temperature τ_c equals the stored one. The tail's shape is
  either flat ("top-k + one tail bucket", spread evenly over the V − k tail tokens) or, in a cache built with
  `--tail-rank R`, the row's R stored coefficients on the cache's fitted logit basis (mean + coefficients · basis,
  docs/teacher-cache.md#low-rank-tail); head padding rows get a very low value.
  The rows are log-probabilities (logits shifted by their log-sum-exp), which softmax, every divergence, entropy,
  argmax and sort are invariant to. Head-mode cache: the cached LM head applied to the cached final hidden state at
  the rows asked for, exactly what the live teacher's deferred head computes (and `linear_head_weight()` gives the
  head to the fused head + loss ops, as with a live teacher);
- `hidden_states[i]` / `last_hidden`: (batch, length, d) with the cached rows at the label positions and zeros
  elsewhere (every built-in method masks teacher positions to the labels); a layer the cache does not hold raises;
- `input_embeddings()` / `output_head_weight()`: the stored tables (memory-mapped, loaded once).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dwakd.interface import ModelView, TokenView
from dwakd.teacher_cache.format import TABLES, TeacherCacheError, logit_mode, mmap_safetensors

logger = logging.getLogger(__name__)

LOG_TAIL_FLOOR = -80.0  # log tail mass below this is treated as e^−80 (a tail that underflowed to 0)
PAD_LOGIT = -1e30  # head padding rows (beyond the tokenizer's vocabulary) of a materialised top-k row
SHAPE_CHUNK_BYTES = 8 << 20  # CPU: rank-R tail rows per step so each temporary stays in reused heap memory


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, stable at both ends."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_to_logits(logp: torch.Tensor, ids: torch.Tensor, log_tail: torch.Tensor, vocab: int, width: int,
                   temperature: float, tail: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """(rows, width) float32 logits from the top-k log-probabilities and the tail's log mass at `temperature`.

    logp, ids: (rows, k) at τ = 1; log_tail: (rows,) log M, M = Σ_{tail} softmax(z/τ) of the true row; tail: the tail's
    shape s = mean + coef · basis as (mean (vocab,), coef (rows, R), basis (R, vocab)), None: flat (one bucket). The k
    entries keep their values; tail token i gets s_i + c with c such that Σ_tail e^{(s_i + c)/τ} / (Σ_top e^{a/τ} +
    Σ_tail e^{(s_i + c)/τ}) = M, i.e. c = τ·(log M − log(1 − M) + logsumexp(a/τ) − logsumexp_tail(s/τ)); flat: s = 0,
    logsumexp_tail = log(V − k). On CPU the shape is formed a few rows at a time: a fresh (rows, V) temporary costs
    more in page faults than its arithmetic.
    """
    rows, k = logp.shape
    logp = logp.float()
    out = torch.full((rows, width), PAD_LOGIT, dtype=torch.float32, device=logp.device)
    if k < vocab:
        tau = float(temperature)
        log_mass = log_tail.float().clamp(LOG_TAIL_FLOOR, -1e-7)  # (rows,)
        shift = tau * (log_mass - log1mexp(log_mass) + torch.logsumexp(logp / tau, -1))  # (rows,)
        if tail is None:
            out[:, :vocab] = (shift - tau * math.log(vocab - k)).unsqueeze(-1)
        else:
            mean, coef, basis = (t.float() for t in tail)
            step = rows if logp.is_cuda else max(1, SHAPE_CHUNK_BYTES // (4 * vocab))
            for lo in range(0, rows, step):
                shape = torch.addmm(mean, coef[lo : lo + step], basis, out=out[lo : lo + step, :vocab])  # (step, V)
                tail_only = (shape / tau).scatter_(1, ids[lo : lo + step], float("-inf"))
                shape += (shift[lo : lo + step] - tau * torch.logsumexp(tail_only, -1)).unsqueeze(-1)
    return out.scatter_(1, ids, logp)


class CachedHiddenStates(Sequence):
    """`hidden_states` of a cached teacher: (batch, length, d) grids for the cached layers; others raise."""

    def __init__(self, layers: dict[int, torch.Tensor], count: int, directory: str):
        self._layers = layers
        self._count = count  # num_hidden_layers + 1 (embedding output first, final layer last)
        self._directory = directory

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(self._count)))
        layer = index + self._count if index < 0 else index
        if layer not in self._layers:
            held = ", ".join(str(i) for i in sorted(self._layers)) or "none"
            raise TeacherCacheError(
                f"teacher cache {self._directory} holds hidden-state layers [{held}] only (of 0..{self._count - 1}); "
                f"layer {index} was asked: rebuild it with `dwakd teacher-cache ... --layers {layer}`")
        return self._layers[layer]


class CachedModelView(ModelView):
    """A teacher `ModelView` over cached rows at the label positions of `view` (see the module docstring)."""

    def __init__(self, rows: dict[str, torch.Tensor], view: TokenView, model: CachedTeacher, vocab_size: int):
        # no ModelView.__init__: there are neither dense logits nor a head to run
        self.model = model
        self.vocab_size = vocab_size
        self._rows = rows
        self._head = None
        self._logits = None
        mask = view.label_mask  # (batch, m)
        flat = mask.reshape(-1)
        self._row_of = torch.where(flat, flat.long().cumsum(0) - 1, torch.full_like(flat, -1, dtype=torch.long))
        self._count = next(iter(rows.values())).shape[0]
        final = model.num_hidden_states - 1
        self._final_rows = None  # head mode: (rows, d) final hidden states in the head's dtype
        if model.logit_mode == "head":
            self._final_rows = rows[f"hidden_{final}"].to(model.lm_head.weight.dtype)
            self._head = model.lm_head
        layers = {}
        for name, values in rows.items():
            if name.startswith("hidden_"):
                layer = int(name[len("hidden_"):])
                values = self._final_rows if layer == final and self._final_rows is not None else values
                grid = torch.zeros(*mask.shape, values.shape[-1], dtype=values.dtype, device=values.device)
                grid[mask] = values  # row-major label order, as stored
                layers[layer] = grid
        self.hidden_states = CachedHiddenStates(layers, model.num_hidden_states, model.directory)
        self._last_hidden = layers.get(final) if self._final_rows is not None else None

    @property
    def logits(self) -> torch.Tensor:
        raise TeacherCacheError("a cached teacher has logits at its label (response) positions only: read them with "
                                "ModelView.logits_at(rows) or label_logits(view)")

    def _materialise(self, index: torch.Tensor) -> torch.Tensor:
        """(len(index), head rows) logits of the cached rows `index` (positions in label-row order)."""
        if self._final_rows is not None:  # head mode: the live teacher's deferred head, on the cached rows
            return self._head(self._final_rows.index_select(0, index))
        if "logits" in self._rows:  # lossless
            return self._rows["logits"].index_select(0, index)
        tail = self._rows["tail"][:, self.model.tail_column].index_select(0, index)
        shape = None
        if "tail_coef" in self._rows:  # rank-R tail: the row's coefficients on the cache's logit basis
            shape = (self.model.tail_mean, self._rows["tail_coef"].index_select(0, index), self.model.tail_basis)
        return topk_to_logits(self._rows["logp"].index_select(0, index), self._rows["ids"].index_select(0, index),
                              tail, self.model.vocab, self.model.head_rows, self.model.tail_temperature, shape)

    def logits_at(self, rows: torch.Tensor) -> torch.Tensor:
        index = self._row_of.index_select(0, rows)
        if rows.numel() and bool((index < 0).any()):
            raise TeacherCacheError("a cached teacher has logits at its label (response) positions only; a method "
                                    "asked for logits at a prompt or padding position")
        return self._materialise(index)

    def label_logits(self, view: TokenView) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(self._count, device=self._row_of.device)
        return self._materialise(index), self._row_of


def cache_refusal(method: Any, lossless: bool = True) -> str:
    """Why a teacher cache cannot serve `method` (a method instance, or its class for the class-level answer), in
    words ("it reads ..."); empty when it can. `lossless=False`: a top-k cache, which also lacks the raw logit
    rows some methods read (`teacher_distribution == "logits"`). Hidden-state layers are checked against the cache
    itself (`CachedTeacher.configure_for`)."""
    refusal = getattr(method, "teacher_cache_refusal", "")
    if not refusal and getattr(method, "needs_attentions", False):
        refusal = "it reads the teacher's attention probabilities, which a cache does not hold"
    if not refusal and not lossless and getattr(method, "teacher_distribution", "full") == "logits":
        refusal = ("it reads the teacher's raw logit rows over the whole vocabulary (not only its distribution), which "
                   "a top-k cache does not hold")
    return refusal


class CachedTeacher(nn.Module):
    """The teacher's embedding table, LM head and config from a cache; `model_view(batch, view)` serves its outputs.

    Stands in for the teacher model everywhere the trainer and methods use it (`MethodContext.teacher_model`,
    `ModelView.model`): `get_input_embeddings()`, `get_output_embeddings()`, `.config`. It has no blocks, so
    calling it raises.
    """

    def __init__(self, cache: Any):
        super().__init__()
        self.directory = str(cache.directory)
        info = cache.manifest["teacher"]
        self.config = cache.teacher_config()
        self.vocab = int(info["vocab_size"])
        self.head_rows = int(info["head_rows"])
        self.num_hidden_states = int(info["num_hidden_states"])
        self.logit_mode = logit_mode(cache.settings)
        self.k = cache.settings["k"]
        self._cached_layers = tuple(int(i) for i in cache.settings["layers"])
        self.temperatures = [float(t) for t in cache.settings.get("temperatures") or [1.0]]
        self.tail_column, self.tail_temperature = 0, self.temperatures[0]
        tables = mmap_safetensors(cache.directory / TABLES)
        embed = tables["embed_tokens"]
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        head = embed if info["tied"] else tables["lm_head"]
        self.lm_head = nn.Linear(head.shape[1], head.shape[0], bias="lm_head_bias" in tables, device="meta",
                                 dtype=head.dtype)
        self.lm_head.weight = self.embed_tokens.weight if info["tied"] else nn.Parameter(head, requires_grad=False)
        if "lm_head_bias" in tables:
            self.lm_head.bias = nn.Parameter(tables["lm_head_bias"], requires_grad=False)
        self.tail_rank = int(cache.settings.get("tail_rank") or 0)  # caches before --tail-rank: a flat tail
        if self.logit_mode == "topk" and self.tail_rank:  # (vocab,) and (R, vocab) float32, moved with the module
            self.register_buffer("tail_mean", tables["tail_mean"], persistent=False)
            self.register_buffer("tail_basis", tables["tail_basis"], persistent=False)
        self.eval()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, *args: Any, **kwargs: Any):
        raise TeacherCacheError(f"this teacher comes from the cache {self.directory}: its transformer blocks are not "
                                "built, so it cannot run; its outputs come with each batch")

    def configure_for(self, method: Any) -> None:
        """Check the cache serves `method` and pick the tail calibration temperature (raises TeacherCacheError)."""
        name = getattr(method, "name", type(method).__name__)
        refusal = cache_refusal(method)
        if refusal:
            raise TeacherCacheError(f"method {name!r} cannot train from the teacher cache {self.directory}: {refusal}; "
                                    "train it with the live teacher (remove teacher.cache)")
        layers = tuple(getattr(method, "teacher_layers", ()))
        missing = [i for i in layers if (i + self.num_hidden_states if i < 0 else i) not in self.cached_layers]
        if missing:
            raise TeacherCacheError(f"method {name!r} reads teacher hidden-state layers {missing}, which the cache "
                                    f"{self.directory} does not hold; rebuild it with --layers "
                                    f"{','.join(str(i) for i in missing)}")
        needs = getattr(method, "teacher_distribution", "full")
        if self.logit_mode != "topk" or needs in ("top-k", "none"):
            return
        if needs == "logits":
            raise TeacherCacheError(f"method {name!r} cannot train from the top-k teacher cache {self.directory}: "
                                    f"{cache_refusal(method, lossless=False)}; build a lossless (--k vocab) or "
                                    "head-mode (--k head) cache for it")
        tau = float(method.teacher_temperature(method.options)) if hasattr(method, "teacher_temperature") else 1.0
        if any(abs(tau - t) < 1e-9 for t in self.temperatures):
            self.tail_column = next(i for i, t in enumerate(self.temperatures) if abs(tau - t) < 1e-9)
            self.tail_temperature = tau
        else:
            self.tail_column, self.tail_temperature = 0, self.temperatures[0]
            logger.warning("teacher cache %s stores tail masses at τ = %s, not at method %r's τ = %s: its teacher "
                           "rows are calibrated at τ = %s (rebuild with --temperatures %s to calibrate them exactly)",
                           self.directory, self.temperatures, name, tau, self.tail_temperature, tau)
        logger.info("teacher cache %s: top-%d rows + %s calibrated at τ = %s for method %r", self.directory, self.k,
                    f"a rank-{self.tail_rank} tail" if self.tail_rank else "one tail bucket", self.tail_temperature,
                    name)

    @property
    def cached_layers(self) -> set[int]:
        return set(self._cached_layers)

    def model_view(self, batch: dict[str, torch.Tensor], view: TokenView, vocab_size: int | None = None
                   ) -> CachedModelView:
        """The teacher's ModelView for one batch from the `teacher_cache_*` tensors the collator added."""
        rows = {key[len("teacher_cache_"):]: value for key, value in batch.items() if key.startswith("teacher_cache_")}
        needed = (f"hidden_{self.num_hidden_states - 1}",) if self.logit_mode == "head" else ("logits", "logp")
        if not any(name in rows for name in needed):
            raise TeacherCacheError("the batch carries no teacher-cache rows: build the data loader with "
                                    "TeacherCache.collator (dwakd.run does when teacher.cache is set)")
        return CachedModelView(rows, view, self, vocab_size or self.vocab)
