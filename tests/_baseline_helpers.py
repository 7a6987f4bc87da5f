"""Shared helpers for the baseline tests (ULD, MinED, MultiLevelOT, DSKDv2, DWA-KDv2, alignment).

Two small *real* tokenizers with different vocabularies and different conventions — byte-level BPE ("Ġ")
for the teacher and Metaspace BPE ("▁") for the student — are trained in
milliseconds on a fixed corpus, so token strings, offsets and the vocabulary map are all real. Models are
1-layer random-init Qwen2 / Llama / GPT-2 whose heads have more rows than the tokenizer has tokens.
The naive references used by the tests live in the test files and share no code with `dwakd`.
"""

from __future__ import annotations

import contextlib
from functools import cache

import torch

from dwakd.alignment.token_strings import token_table
from dwakd.data.collator import collate_side
from dwakd.data.tokenization import encode_side
from dwakd.methods.base import DistillationInputs, MethodContext, ModelView, TokenView
from dwakd.models import build_tiny_model

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A café in Zürich serves crème brûlée and tea.",
    "Distillation moves knowledge from a teacher to a student model.",
    "Numbers like 12345 and 678 are split differently by each tokenizer.",
    "Hello world, hello teacher, hello student! Good answers are short.",
    "Below is an instruction that describes a task. Write a response.",
] * 3

# (prompt, response) pairs of different lengths; the second is the shortest, so the batch is padded.
EXAMPLES = [
    ("### Instruction:\nName a fast animal.\n\n### Response:\n", "The quick brown fox jumps over the lazy dog."),
    ("### Instruction:\nSay hi.\n\n### Response:\n", "Hello world!"),
    ("### Instruction:\nWhere is the café?\n\n### Response:\n", "A café in Zürich serves 12345 teas."),
]
HEAD_PADDING = 3  # extra rows in every head beyond the tokenizer's tokens (must never count)


@cache
def teacher_tokenizer(vocab_size: int = 400):
    """Byte-level BPE ("Ġ" for spaces), EOS "<|endoftext|>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@cache
def student_tokenizer(vocab_size: int = 330):
    """Metaspace BPE ("▁" for spaces, a prefix space on the first word), EOS "</s>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")


def encode(tokenizer, examples=EXAMPLES, max_prompt_length: int = 64, max_length: int = 96,
           extra_pad: int = 0) -> TokenView:
    """A right-padded `TokenView` built like the collator builds it (prompt and response tokenized separately)."""
    sides = []
    for prompt, response in examples:
        p = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        r = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        side, _ = encode_side(p["input_ids"], p["offset_mapping"], r["input_ids"], r["offset_mapping"],
                              len(prompt), tokenizer.eos_token_id, max_prompt_length, max_length)
        sides.append(side)
    cols = collate_side(sides, tokenizer.pad_token_id)
    view = TokenView(cols["input_ids"], cols["attention_mask"], cols["labels"], cols["input_offsets"],
                     cols["label_offsets"])
    if extra_pad:
        view = pad_view(view, extra_pad, tokenizer.pad_token_id)
    return view


def pad_view(view: TokenView, extra: int, pad_id: int) -> TokenView:
    """The same batch with `extra` more padding columns on the right."""
    b = view.input_ids.shape[0]

    def cat(x: torch.Tensor, value) -> torch.Tensor:
        pad = torch.full((b, extra, *x.shape[2:]), value, dtype=x.dtype)
        return torch.cat([x, pad], 1)

    return TokenView(cat(view.input_ids, pad_id), cat(view.attention_mask, 0), cat(view.labels, -100),
                     cat(view.input_offsets, -1), cat(view.label_offsets, -1))


def tiny_model(arch: str, vocab: int, seed: int, hidden: int, dtype=torch.float64) -> torch.nn.Module:
    """A 1-layer random-init causal LM with HEAD_PADDING more head rows than `vocab`, eval mode (no dropout)."""
    model = build_tiny_model(arch, vocab + HEAD_PADDING, seed=seed, hidden_size=hidden, num_layers=1, num_heads=2,
                             intermediate_size=2 * hidden, max_positions=128, bos_token_id=None, eos_token_id=None)
    return model.to(dtype).eval()


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Teacher: eval mode, no parameter requires grad."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Setup:
    """Tokenizers, views, a student (GPT-2 or Llama) and a frozen Qwen2 teacher, ready to build a method."""

    def __init__(self, student_arch: str = "gpt2", seed: int = 0, extra_pad: int = 0, examples=EXAMPLES):
        self.s_tok, self.t_tok = student_tokenizer(), teacher_tokenizer()
        self.s_view = encode(self.s_tok, examples, extra_pad=extra_pad)
        self.t_view = encode(self.t_tok, examples)
        self.student = tiny_model(student_arch, len(self.s_tok), seed, hidden=16)
        self.teacher = frozen(tiny_model("qwen2", len(self.t_tok), seed + 1, hidden=24))

    def context(self, cache_dir) -> MethodContext:
        return MethodContext(self.student.config, self.teacher.config, self.s_tok, self.t_tok, self.student,
                             self.teacher, str(cache_dir))

    def inputs(self, hidden: bool = False, progress: float = 0.0) -> DistillationInputs:
        """Run both models (teacher without grad) and wrap their outputs like the trainer does."""
        s_out = self.student(input_ids=self.s_view.input_ids, attention_mask=self.s_view.attention_mask,
                             output_hidden_states=hidden)
        with torch.no_grad():
            t_out = self.teacher(input_ids=self.t_view.input_ids, attention_mask=self.t_view.attention_mask,
                                 output_hidden_states=hidden)
        student = ModelView(s_out.logits, s_out.hidden_states if hidden else None, self.student, len(self.s_tok))
        teacher = ModelView(t_out.logits, t_out.hidden_states if hidden else None, self.teacher, len(self.t_tok))
        num_items = self.s_view.label_mask.sum()
        return DistillationInputs(self.s_view, self.t_view, student, teacher, num_items, progress)


def deferred(view: ModelView) -> ModelView:
    """The trainer's deferred-head view of the same outputs: hidden states, attentions and the head, no logits (what
    lets a method's fused ops read hidden states and head weights)."""
    return ModelView(None, view.hidden_states, view.model, view.vocab_size, head=view.model.get_output_embeddings(),
                     last_hidden=view.hidden_states[-1], attentions=view.attentions)


def run_deferred(setup: Setup, cache_dir, name: str, options: dict, defer: tuple[bool, bool] = (True, True),
                 bf16_autocast: bool = False):
    """(loss, parts, {name: gradient} of the student's trainable parameters) of one pass of method `name` on
    `setup`, with the student / teacher views deferred as `defer` says (else dense logits). With `bf16_autocast` the
    models and the loss run under CPU bf16 autocast and the backward outside it, as in training."""
    from dwakd.methods import build_method

    method = build_method(name, setup.context(cache_dir), options)
    # no autocast context of its own without bf16_autocast: `enabled=False` would switch off a caller's autocast
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16_autocast else contextlib.nullcontext():
        inputs = setup.inputs(hidden=True)
        s_out = deferred(inputs.student_out) if defer[0] else inputs.student_out
        t_out = deferred(inputs.teacher_out) if defer[1] else inputs.teacher_out
        result = method(DistillationInputs(inputs.student, inputs.teacher, s_out, t_out, inputs.num_items))
    return result.loss.detach(), result.parts, student_grads(setup.student, result.loss)


def check_auto_choice(run, tmp_path, fused_calls: list[str]) -> None:
    """`head_fusion: auto` takes the dense path in fp32 on a CPU and the fused ops of both sides under bf16 autocast.

    `run(setup, tmp_path, head_fusion)` runs a method's loss on `setup` and returns (loss, ...); `fused_calls`
    records each side that reached a fused op (each test file patches its method's ops to append to it).
    """
    setup = Setup()
    run(setup, tmp_path, "auto")
    assert fused_calls == []
    setup.student.float()
    setup.teacher.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = run(setup, tmp_path, "auto")[0]
    assert fused_calls == ["student", "teacher"] and torch.isfinite(loss)


def check_bf16_fused_follows_dense(run, tmp_path, fused_calls: list[str], expected_calls: list[str]) -> None:
    """Under bf16 autocast, with the backward outside it as in training, `head_fusion: fused` gives the dense path's
    loss and parts and its gradients to bf16 rounding.

    Both paths form bf16 head products and do fp32 math after them, so the loss agrees to fp32 rounding (measured:
    equal for ULD, MultiLevelOT and ALM, 1e-7 relative for CDM), while a path that ignored autocast would be off by
    the bf16 rounding of the logits (the fp32 loss differs by ≥ 8e-6 relative, checked here so the bound stays
    meaningful). Parts are compared to 1e-6 of the loss: CDM's fused path pools hidden rows before the head and its
    dense path pools logits after it, two places to round to bf16, so its small KD part (0.002 nats on these
    near-uniform models) moves by 1.6e-4 of itself. Gradients differ where the dense path's autograd rounds the head
    products' gradients to bf16 and the fused ops accumulate them in fp32 (measured ≤ 7.6e-3 of the largest entry).
    `run(setup, tmp_path, mode, bf16_autocast=...)` returns (loss, parts, student gradients); `expected_calls` is
    what the fused pass records.
    """
    setup = Setup()
    setup.student.float()
    setup.teacher.float()
    fp32 = run(setup, tmp_path, "dense")
    dense = run(setup, tmp_path, "dense", bf16_autocast=True)
    assert fused_calls == []
    fused = run(setup, tmp_path, "fused", bf16_autocast=True)
    assert fused_calls == expected_calls
    assert abs(float(fp32[0] - dense[0])) > 2e-6 * abs(float(dense[0]))  # the bf16 products are really used
    torch.testing.assert_close(fused[0], dense[0], rtol=1e-6, atol=0)
    assert fused[1].keys() == dense[1].keys()
    for name, value in dense[1].items():
        torch.testing.assert_close(fused[1][name], value, rtol=0, atol=1e-6 * abs(float(dense[0])), msg=name)
    assert fused[2].keys() == dense[2].keys() and dense[2]
    for name, grad in dense[2].items():
        assert float((fused[2][name] - grad).abs().max()) <= 2e-2 * float(grad.abs().max()), name


def student_grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: gradient of `loss`} over `model`'s trainable parameters that `loss` reaches."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


def params_with_grad(*modules: torch.nn.Module) -> set[str]:
    """Names (prefixed by module index) of parameters whose .grad is set and non-zero."""
    names = set()
    for k, module in enumerate(modules):
        for name, p in module.named_parameters():
            if p.grad is not None and bool(p.grad.abs().sum() > 0):
                names.add(f"{k}.{name}")
    return names


def trainable_names(*modules: torch.nn.Module) -> set[str]:
    """Names (prefixed by module index) of parameters that require grad."""
    return {f"{k}.{n}" for k, m in enumerate(modules) for n, p in m.named_parameters() if p.requires_grad}


def optimise_steps(setup: Setup, method, steps: int = 8, lr: float = 1e-2, hidden: bool = False) -> list[float]:
    """Adam steps on one fixed batch (student + method parameters); returns the loss before each step."""
    params = [p for p in list(setup.student.parameters()) + list(method.parameters()) if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        out = method(setup.inputs(hidden=hidden))
        assert torch.isfinite(out.loss)
        losses.append(float(out.loss.detach()))
        out.loss.backward()
        optimiser.step()
    return losses


def naive_ce_sum(logits: torch.Tensor, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Σ over label positions of −log softmax(logits[:vocab])[label], by a loop over positions."""
    total = logits.new_zeros(())
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            if labels[b, i] != -100:
                total = total - torch.log_softmax(logits[b, i, :vocab], -1)[labels[b, i]]
    return total


def leaf_logits(inputs: DistillationInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace both logits by fresh leaves that require grad (teacher too, to catch a missing detach)."""
    s = inputs.student_out.logits.detach().clone().requires_grad_(True)
    t = inputs.teacher_out.logits.detach().clone().requires_grad_(True)
    inputs.student_out.logits, inputs.teacher_out.logits = s, t
    return s, t


# ---------------------------------------------------------------- naive references shared by several tests


def naive_levenshtein(a, b) -> int:
    """Textbook O(len(a)·len(b)) edit distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def naive_lower(data: bytes) -> bytes:
    return bytes(c + 32 if 65 <= c <= 90 else c for c in data)


def naive_vocab_map(teacher: list[bytes], student: list[bytes], t_eos=None, s_eos=None):
    """map(t) = lowest student id with the same bytes, else lowest id minimising the lower-cased edit distance."""
    mapping, dist = [], []
    for k, t in enumerate(teacher):
        if t_eos is not None and k == t_eos:
            mapping.append(s_eos), dist.append(0)
            continue
        same = [i for i, s in enumerate(student) if s and s == t]
        if same:
            mapping.append(same[0]), dist.append(0)
            continue
        scored = [(naive_levenshtein(naive_lower(t), naive_lower(s)), i) for i, s in enumerate(student) if s]
        d, i = min(scored)
        mapping.append(i), dist.append(d)
    return mapping, dist


def naive_dtw(cost: list[list[float]]) -> list[tuple[int, int]]:
    """The reference DTW: accumulate, then walk back preferring diagonal, then (i−1, j), then (i, j−1)."""
    n, m = len(cost), len(cost[0])
    inf = float("inf")
    acc = [[inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0.0
    for i in range(n):
        for j in range(m):
            acc[i + 1][j + 1] = cost[i][j] + min(acc[i][j + 1], acc[i + 1][j], acc[i][j])
    d = [row[1:] for row in acc[1:]]
    i, j, path = n - 1, m - 1, []
    while i > 0 or j > 0:
        path.append((i, j))
        options = [d[i - 1][j - 1] if i > 0 and j > 0 else inf, d[i - 1][j] if i > 0 else inf,
                   d[i][j - 1] if j > 0 else inf]
        move = options.index(min(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    path.append((0, 0))
    return path[::-1]


def naive_student_to_teacher(mapping: list[int], dist: list[int], student_size: int) -> list[int]:
    """For each student id, the teacher id mapped onto it with the smallest distance, then the lowest id; −1 if none."""
    best: dict[int, tuple[int, int]] = {}
    for t, (s, d) in enumerate(zip(mapping, dist)):
        if s >= 0 and (s not in best or (d, t) < best[s]):
            best[s] = (d, t)
    return [best[s][1] if s in best else -1 for s in range(student_size)]


def naive_exact_pairs(student: TokenView, teacher: TokenView) -> set[tuple[int, int, int]]:
    """(batch, student pos, teacher pos) covering the same text piece, by loops over positions."""

    def pieces(view: TokenView, b: int) -> dict[tuple[int, int], int]:
        positions = [p for p in range(view.labels.shape[1]) if view.labels[b, p] != -100]
        spans = {p: tuple(view.label_offsets[b, p].tolist()) for p in positions}
        prev_end = {p: int(view.input_offsets[b, p, 1]) for p in positions}
        found: dict[tuple[int, int], list[int]] = {}
        for k, p in enumerate(positions):
            start, end = spans[p]
            bad = start < prev_end[p] and k > 0
            if k + 1 < len(positions):
                q = positions[k + 1]
                bad = bad or spans[q][0] < prev_end[q]
            if bad:
                continue
            piece = (start if k == 0 else prev_end[p], end)
            found.setdefault(piece, []).append(p)
        return {piece: ps[0] for piece, ps in found.items() if len(ps) == 1}

    out = set()
    for b in range(student.labels.shape[0]):
        s_pieces, t_pieces = pieces(student, b), pieces(teacher, b)
        out |= {(b, s_pieces[k], t_pieces[k]) for k in s_pieces.keys() & t_pieces.keys()}
    return out


def naive_shared(setup: Setup) -> tuple[list[int], list[int]]:
    """(teacher ids, student ids) with byte-identical decoded text (lowest student id), EOS ↔ EOS."""
    s_table, t_table = token_table(setup.s_tok), token_table(setup.t_tok)
    t_ids, s_ids = [], []
    for t, text in enumerate(t_table.data):
        if t == setup.t_tok.eos_token_id:
            t_ids.append(t), s_ids.append(setup.s_tok.eos_token_id)
            continue
        same = [s for s, other in enumerate(s_table.data) if other and other == text]
        if text and same:
            t_ids.append(t), s_ids.append(same[0])
    return t_ids, s_ids


MORE_EXAMPLES = [
    ("### Instruction:\nDescribe the student.\n\n### Response:\n",
     "Hello student! Distillation moves knowledge from a teacher to a student model. Good answers are short."),
    ("### Instruction:\nCount.\n\n### Response:\n", "Numbers like 678 and 12345 are split differently."),
]


def linked_setup(seed: int = 0, extra_pad: int = 0, student_arch: str = "gpt2") -> Setup:
    """A `Setup` with more text whose teacher head, on the shared vocabulary, is a linear image of the student's.

    W_t[shared] = W_s[shared]·M (+ small noise) makes the projected teacher reproduce the teacher's logits on shared
    tokens, so the dual-space methods see a mix of agreeing and disagreeing positions (random heads never agree).
    """
    setup = Setup(student_arch=student_arch, seed=seed, extra_pad=extra_pad, examples=EXAMPLES + MORE_EXAMPLES)
    t_ids, s_ids = naive_shared(setup)
    generator = torch.Generator().manual_seed(seed)
    d_s = setup.student.get_output_embeddings().weight.shape[1]
    d_t = setup.teacher.get_output_embeddings().weight.shape[1]
    mix = torch.randn(d_s, d_t, generator=generator, dtype=torch.float64)
    noise = 0.05 * torch.randn(len(t_ids), d_t, generator=generator, dtype=torch.float64)  # keeps full rank d_t
    with torch.no_grad():
        linked = setup.student.get_output_embeddings().weight[s_ids] @ mix + noise
        setup.teacher.get_output_embeddings().weight[t_ids] = linked
    return setup
