"""Shared helpers for the DSKD / DWA-KD tests: tiny models, hand-built dual-tokenized batches, naive references.

The references here are written for the tests and share no code with `dwakd.modules`: Python loops over
sequences, positions and pairs, float64 arithmetic on small vectors, explicit formulas. Where they need gradients
(to compare with the implementation's), they use torch scalars/vectors in float64 so autograd can follow them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dwakd.methods.base import DistillationInputs, MethodContext, ModelView, TokenView
from dwakd.models import build_tiny_model


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore: on a shared 2-core machine, tiny tensors on two spinning
    threads run 10–50× slower than on one (measured), and they gain nothing from a second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Tokenizer vocab smaller than the head: the last rows of each head are padding and must never count.
STUDENT_VOCAB, STUDENT_ROWS = 37, 40
TEACHER_VOCAB, TEACHER_ROWS = 53, 56


def record_fused_calls(monkeypatch, *modules) -> list:
    """Wrap `fused_head_kd` as imported by each of `modules`; the returned list gets each call's `divergence`
    (None for a CE-only call), which proves which path a method took."""
    calls: list = []
    for module in modules:
        original = module.fused_head_kd

        def counted(*args, _original=original, **kwargs):
            calls.append(kwargs.get("divergence"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "fused_head_kd", counted)
    return calls


def tiny_student(arch: str = "gpt2", seed: int = 0, dtype: torch.dtype = torch.float64, **sizes) -> torch.nn.Module:
    """A 1-layer random-init student (GPT-2 by default, d = 16) whose head has more rows than the vocab; eval mode."""
    defaults = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=64)
    model = build_tiny_model(arch, STUDENT_ROWS, seed=seed, **{**defaults, **sizes})
    return model.to(dtype).eval()  # no dropout: two forward passes must agree


def tiny_opt_student(proj_dim: int = 12, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A 1-layer OPT student whose embedding/head width (word_embed_proj_dim) differs from its hidden size (16)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(vocab_size=STUDENT_ROWS, hidden_size=16, word_embed_proj_dim=proj_dim, num_hidden_layers=1,
                       num_attention_heads=2, ffn_dim=32, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def tiny_teacher(seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A frozen 1-layer random-init Qwen2 teacher (d = 24) in eval mode."""
    model = build_tiny_model(
        "qwen2", TEACHER_ROWS, seed=seed, hidden_size=24, num_layers=1, num_heads=2, num_kv_heads=1,
        intermediate_size=48, max_positions=64,
    ).to(dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_view(prompt_lens: list[int], response_lens: list[int], vocab: int, seed: int, extra_pad: int = 0) -> TokenView:
    """Right-padded batch: prompt + response tokens; labels[i] = token i+1 on response positions, -100 elsewhere.

    The last prompt position predicts the first response token; the final response token (the "EOS") predicts
    nothing from the last position. `extra_pad` adds padding columns (dynamic vs fixed padding).
    """
    gen = torch.Generator().manual_seed(seed)
    totals = [p + r for p, r in zip(prompt_lens, response_lens, strict=True)]
    length = max(totals) + extra_pad
    batch = len(totals)
    ids = torch.zeros(batch, length, dtype=torch.long)
    attn = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    offsets = torch.full((batch, length, 2), -1, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        tokens = torch.randint(1, vocab, (p + r,), generator=gen)
        ids[b, : p + r] = tokens
        attn[b, : p + r] = 1
        for i in range(p - 1, p + r - 1):
            labels[b, i] = tokens[i + 1]
        offsets[b, : p + r, 0] = torch.arange(p + r)
        offsets[b, : p + r, 1] = torch.arange(1, p + r + 1)
    return TokenView(ids, attn, labels, offsets, offsets.clone())


@dataclass
class Batch:
    """Both sides of one hand-built batch (different tokenizations, lengths and padding)."""

    student: TokenView
    teacher: TokenView


def make_batch(extra_pad_student: int = 0, extra_pad_teacher: int = 0) -> Batch:
    """Three sequences; the sides differ in prompt and response lengths; one sequence has a 1-token response."""
    student = make_view([3, 5, 2], [5, 2, 6], STUDENT_VOCAB, seed=11, extra_pad=extra_pad_student)
    teacher = make_view([4, 3, 3], [6, 3, 5], TEACHER_VOCAB, seed=12, extra_pad=extra_pad_teacher)
    return Batch(student, teacher)


def context_for(student: torch.nn.Module, teacher: torch.nn.Module) -> MethodContext:
    """MethodContext from the two models' configs (no tokenizers needed by these methods)."""
    return MethodContext(student.config, teacher.config, None, None, student, teacher)


def run_models(
    student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch, progress: float = 0.0, num_items=None
) -> DistillationInputs:
    """Forward both models like the trainer does (teacher under no_grad) and pack DistillationInputs."""
    s = batch.student
    out = student(input_ids=s.input_ids, attention_mask=s.attention_mask, output_hidden_states=True, use_cache=False)
    t = batch.teacher
    with torch.no_grad():
        t_out = teacher(
            input_ids=t.input_ids, attention_mask=t.attention_mask, output_hidden_states=True, use_cache=False
        )
    if num_items is None:
        num_items = s.label_mask.sum()
    return DistillationInputs(
        student=s,
        teacher=t,
        student_out=ModelView(out.logits, out.hidden_states, student, STUDENT_VOCAB),
        teacher_out=ModelView(t_out.logits, t_out.hidden_states, teacher, TEACHER_VOCAB),
        num_items=torch.as_tensor(num_items),
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------------------------
# Naive references (float64, loops)
# ---------------------------------------------------------------------------------------------------------------


def naive_log_softmax(z: torch.Tensor) -> torch.Tensor:
    """log softmax of a 1-D vector by the textbook formula."""
    top = z.max().detach()
    return z - top - torch.log(torch.exp(z - top).sum())


def naive_divergence_vec(student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float,
                         lam: float = 0.1, alpha: float = 0.5) -> torch.Tensor:
    """D(teacher → student) of two 1-D logit vectors, differentiable in `student` (teacher is a constant)."""
    log_q = naive_log_softmax(student / tau)
    log_p = naive_log_softmax(teacher.detach() / tau)
    q, p = log_q.exp(), log_p.exp()
    if kind == "fkl":
        return (p * (log_p - log_q)).sum()
    if kind == "rkl":
        return (q * (log_q - log_p)).sum()
    if kind == "sfkl":
        return (p * (log_p - torch.log(lam * p + (1 - lam) * q))).sum()
    if kind == "srkl":
        return (q * (log_q - torch.log((1 - lam) * p + lam * q))).sum()
    if kind == "js":
        mid = 0.5 * (p + q)
        return 0.5 * (p * (log_p - torch.log(mid))).sum() + 0.5 * (q * (log_q - torch.log(mid))).sum()
    if kind == "akl":
        pl, ql = p.tolist(), q.detach().tolist()
        order = sorted(range(len(pl)), key=lambda k: pl[k])  # ascending teacher probability
        cum, g_head, g_tail = 0.0, 0.0, 0.0
        for k in order:
            cum += pl[k]
            if cum <= alpha:
                g_tail += abs(pl[k] - ql[k])
            else:
                g_head += abs(pl[k] - ql[k])
        fkl = (p * (log_p - log_q)).sum()
        rkl = (q * (log_q - log_p)).sum()
        return (g_head * fkl + g_tail * rkl) / (g_head + g_tail)
    raise ValueError(kind)


def naive_std(vectors: list[torch.Tensor]) -> float:
    """Unbiased standard deviation of every entry of a list of 1-D vectors."""
    values = [float(v) for vec in vectors for v in vec.tolist()]
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """W x + b for one vector, written out."""
    return layer.weight.double() @ x + layer.bias.double()


def valid_positions(view: TokenView, b: int) -> list[int]:
    """Positions of sequence b that carry a label."""
    return [i for i in range(view.labels.shape[1]) if int(view.labels[b, i]) != -100]


def naive_cosine_cost(x: list[torch.Tensor], y: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """C[i][j] = 1 − x_i·y_j / (|x_i||y_j|)."""
    return [[1 - (xi @ yj) / (torch.sqrt(xi @ xi) * torch.sqrt(yj @ yj)) for yj in y] for xi in x]


def naive_soft_dtw(cost: list[list[torch.Tensor]], gamma: float) -> torch.Tensor:
    """R(n, m) of the Soft-DTW recursion with softmin_γ(a) = −γ log Σ exp(−a/γ), by a double loop."""
    n, m = len(cost), len(cost[0])
    R: dict[tuple[int, int], torch.Tensor] = {(0, 0): torch.zeros((), dtype=torch.float64)}
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = [R[k] for k in ((i - 1, j - 1), (i - 1, j), (i, j - 1)) if k in R]
            stacked = torch.stack(prev)
            R[(i, j)] = cost[i - 1][j - 1] - gamma * torch.log(torch.exp(-stacked / gamma).sum())
    return R[(n, m)]


def naive_band(attn: list[list[float]], base: float, kappa: float, beta: float) -> tuple[list[float], list[float]]:
    """Band centre and width per row from a row-stochastic n×m attention matrix (docs/methods.md §5.3 formulas)."""
    n, m = len(attn), len(attn[0])
    centres, widths = [], []
    for i, row in enumerate(attn):
        total = sum(row)
        row = [a / total for a in row]
        soft = sum(a * j for j, a in enumerate(row))
        lin = i * (m - 1) / (n - 1) if n > 1 else 0.0
        ent = -sum(a * math.log(a) for a in row if a > 0)
        centres.append(beta * soft + (1 - beta) * lin)
        widths.append(base + kappa * ent)
    return centres, widths


@dataclass
class RefOptions:
    """The knobs the naive method reference understands."""

    kind: str = "fkl"
    tau: float = 2.0
    kd_rate: float = 0.5
    weights: bool = False
    gate: bool = True
    dtw: str = "off"  # off | plain | banded
    layers: tuple[str, ...] = ("hidden", "embedding")
    gamma: float = 2.0
    base: float = 5.0
    kappa: float = 2.0
    beta: float = 0.7
    rho: float = 1.0
    lambda_dtw: float = 0.2


def naive_method_loss(method, inputs: DistillationInputs, o: RefOptions) -> dict[str, torch.Tensor]:
    """DSKD-CMA / DWA-KD loss and parts by loops over sequences and positions (float64, autograd-capable)."""
    proj = method.projectors
    s, t = inputs.student, inputs.teacher
    s_model, t_model = inputs.student_out.model, inputs.teacher_out.model
    E_s = s_model.get_input_embeddings().weight.double()
    E_t = t_model.get_input_embeddings().weight.double()
    W_s = s_model.get_output_embeddings().weight.double()[:STUDENT_VOCAB].detach()
    W_t = t_model.get_output_embeddings().weight.double()[:TEACHER_VOCAB].detach()
    h_s_all = inputs.student_out.hidden_states[-1].double()
    h_t_all = inputs.teacher_out.hidden_states[-1].double()
    z_s_all = inputs.student_out.logits.double()
    z_t_all = inputs.teacher_out.logits.double()
    batch = s.input_ids.shape[0]
    S = [valid_positions(s, b) for b in range(batch)]
    T = [valid_positions(t, b) for b in range(batch)]

    # global stds over valid teacher positions of the whole micro-batch
    keys_raw = {
        (b, j): torch.cat([E_t[t.input_ids[b, j]], E_t[t.labels[b, j]]]).detach() for b in range(batch) for j in T[b]
    }
    tgt_raw = {(b, j): E_t[t.labels[b, j]].detach() for b in range(batch) for j in T[b]}
    hid_raw = {(b, j): h_t_all[b, j].detach() for b in range(batch) for j in T[b]}
    sd_k = naive_std(list(keys_raw.values()))
    sd_e = naive_std(list(tgt_raw.values()))
    sd_h = naive_std(list(hid_raw.values()))

    zero = torch.zeros((), dtype=torch.float64)
    ce, t2s_ce, t2s_kd, s2t_kd, dtw_h, dtw_e = zero, zero, zero, zero, zero, zero
    for b in range(batch):
        if not S[b] or not T[b]:
            continue
        keys = [keys_raw[(b, j)] / sd_k for j in T[b]]
        v_t = [linear(proj.t2s, hid_raw[(b, j)] / sd_h + tgt_raw[(b, j)] / sd_e) for j in T[b]]
        v_s = [linear(proj.s2t, h_s_all[b, i]) for i in S[b]]
        queries = [linear(proj.query, torch.cat([E_s[s.input_ids[b, i]], E_s[s.labels[b, i]]]).detach()) for i in S[b]]
        scale = math.sqrt(keys[0].numel())
        scores = [[q @ k / scale for k in keys] for q in queries]  # n × m

        # student space
        raw_w, kd_vals, t2s_logit_list = [], [], []
        for a, i in enumerate(S[b]):
            y = int(s.labels[b, i])
            z = z_s_all[b, i, :STUDENT_VOCAB]
            ce = ce - naive_log_softmax(z)[y]
            row = torch.stack(scores[a])
            att = torch.exp(naive_log_softmax(row))
            hidden = sum(att[c] * v_t[c] for c in range(len(T[b])))
            logits = W_s @ hidden
            t2s_logit_list.append(logits)
            t2s_ce = t2s_ce - naive_log_softmax(logits)[y]
            d = naive_divergence_vec(z, logits.detach(), o.kind, o.tau)
            kd_vals.append(d)
            if o.weights:
                p = torch.exp(naive_log_softmax(z.detach())).tolist()
                ent = -sum(pk * math.log(pk) for pk in p if pk > 0) / math.log(STUDENT_VOCAB)
                g = max(torch.exp(naive_log_softmax(logits.detach())).tolist()) if o.gate else 1.0
                raw_w.append(ent * g)
            else:
                raw_w.append(1.0 if int(logits.argmax()) == y else 0.0)
        if o.weights:
            total = sum(raw_w)
            raw_w = [w * len(S[b]) / total for w in raw_w]
        for w, d in zip(raw_w, kd_vals, strict=True):
            t2s_kd = t2s_kd + w * d

        # teacher space
        raw_u, kl_vals = [], []
        for c, j in enumerate(T[b]):
            col = torch.stack([scores[a][c] for a in range(len(S[b]))])
            att = torch.exp(naive_log_softmax(col))
            hidden = sum(att[a] * v_s[a] for a in range(len(S[b])))
            logits = W_t @ hidden
            zt = z_t_all[b, j, :TEACHER_VOCAB]
            kl_vals.append(naive_divergence_vec(logits, zt, "fkl", o.tau))
            if o.weights:
                p = torch.exp(naive_log_softmax(zt)).tolist()
                ent = -sum(pk * math.log(pk) for pk in p if pk > 0) / math.log(TEACHER_VOCAB)
                raw_u.append(1.0 - ent)
            else:
                raw_u.append(1.0)
        if o.weights:
            total = sum(raw_u)
            raw_u = [u * len(T[b]) / total for u in raw_u]
        for u, d in zip(raw_u, kl_vals, strict=True):
            s2t_kd = s2t_kd + u * d

        # sequence level
        if o.dtw != "off":
            attn_rows = [torch.exp(naive_log_softmax(torch.stack(r))).tolist() for r in scores]
            centres, widths = naive_band(attn_rows, o.base, o.kappa, o.beta)
            for layer in o.layers:
                if layer == "hidden":
                    xs = [h_s_all[b, i] for i in S[b]]
                    ys = [linear(proj.t2s, hid_raw[(b, j)] / sd_h) for j in T[b]]
                else:
                    xs = [E_s[s.labels[b, i]] for i in S[b]]
                    ys = [linear(method.dwa.embedding, E_t[t.labels[b, j]].detach()) for j in T[b]]
                cross = naive_cosine_cost(xs, ys)
                if o.dtw == "banded":
                    cross = [[cross[r][c] + (o.rho if abs(c - centres[r]) > widths[r] else 0.0)
                              for c in range(len(ys))] for r in range(len(xs))]
                self_x = naive_soft_dtw(naive_cosine_cost(xs, xs), o.gamma)
                self_y = naive_soft_dtw(naive_cosine_cost(ys, ys), o.gamma)
                value = naive_soft_dtw(cross, o.gamma) - 0.5 * (self_x + self_y)
                if layer == "hidden":
                    dtw_h = dtw_h + value
                else:
                    dtw_e = dtw_e + value

    n = float(inputs.num_items)
    parts = {"ce": ce / n, "t2s_ce": t2s_ce / n, "t2s_kd": t2s_kd / n, "s2t_kd": s2t_kd / n}
    kd = parts["t2s_ce"] + parts["t2s_kd"] + parts["s2t_kd"]
    loss = (1 - o.kd_rate) * parts["ce"] + o.kd_rate * kd
    if o.dtw != "off":
        for layer, total in (("hidden", dtw_h), ("embedding", dtw_e)):
            if layer in o.layers:
                parts[f"dtw_{layer}"] = total / n
        loss = loss + o.lambda_dtw * sum(parts[f"dtw_{layer}"] for layer in o.layers)
    parts["loss"] = loss
    return parts


def trainable(method, student) -> list[tuple[str, torch.nn.Parameter]]:
    """Named trainable parameters of student and method, in a fixed order."""
    named = [(f"student.{k}", p) for k, p in student.named_parameters() if p.requires_grad]
    named += [(f"method.{k}", p) for k, p in method.named_parameters() if p.requires_grad]
    return named


def grads_of(loss: torch.Tensor, params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """d loss / d param for each named parameter (zeros where the loss does not depend on it)."""
    values = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return {name: (torch.zeros_like(p) if g is None else g) for (name, p), g in zip(params, values, strict=True)}


def aim_t2s_at_gold(method, student, batch) -> int:
    """Make argmax(t2s_logits) a known token k and put k as the gold label at some positions, so DSKD's
    correctness mask selects some positions and not others (random projectors would almost never hit the gold)."""
    head = student.get_output_embeddings().weight.detach()[:STUDENT_VOCAB]
    k = int(head.norm(dim=-1).argmax())
    with torch.no_grad():
        method.projectors.t2s.weight.mul_(1e-3)
        method.projectors.t2s.bias.copy_(10 * head[k] / head[k].pow(2).sum())
    for b in range(batch.student.labels.shape[0]):
        for i in valid_positions(batch.student, b)[::2]:
            batch.student.labels[b, i] = k
    return k
