"""Fused LM head + KL-family divergence (`dwakd.ops.fused_kd`) against its dense plain-PyTorch reference.

The reference (`head_kd_reference`: dense logits, textbook formulas, autograd) is itself checked against
`dwakd.modules.divergences.divergence` (tested against Python loops in test_divergences.py) and against
`dwakd.modules.token_weights` for the statistics. The fused op must then match the reference in value and in the
gradients w.r.t. both hidden states and the prediction head, for every divergence, τ ≠ 1, with and without the CE
terms, per-row weights and masks, heads with padding rows, both backward modes, fp32, float64 and bf16 autocast;
keep no (rows × V) tensor for backward; and stay near one chunk's working set in peak memory.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _kd_helpers import one_thread

from dwakd.evaluation.memory import peak_bytes
from dwakd.modules.divergences import divergence as logits_divergence
from dwakd.modules.token_weights import normalized_entropy, peak_probability
from dwakd.ops.fused_kd import DIVERGENCES, STATISTICS, fused_head_kd, head_kd_reference
from dwakd.ops.fused_kd.reference import reference_divergence

ROWS, VOCAB, HEAD_ROWS, D_PRED, D_TARGET = 11, 37, 41, 6, 9  # 4 padding head rows; hidden sizes differ per side
# matmul chunks of 5 rows (5, 5, 1), elementwise blocks of 2 rows inside them
SIZES = {"chunk_elements": 5 * VOCAB, "block_elements": 2 * VOCAB}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def make_case(dtype=torch.float64, seed=0, rows=ROWS, pred_head_grad=True, scale=1.0):
    """Random hidden states and heads; labels with one ignored row; per-row output weights a_div, a_pce, a_tce."""
    g = torch.Generator().manual_seed(seed)
    pred_hidden = (torch.randn(rows, D_PRED, generator=g, dtype=dtype) * scale).requires_grad_()
    pred_weight = torch.randn(HEAD_ROWS, D_PRED, generator=g, dtype=dtype).requires_grad_(pred_head_grad)
    target_hidden = (torch.randn(rows, D_TARGET, generator=g, dtype=dtype) * scale).requires_grad_()
    target_weight = torch.randn(HEAD_ROWS, D_TARGET, generator=g, dtype=dtype)
    labels = torch.randint(0, VOCAB, (rows,), generator=g)
    if rows > 2:
        labels[2] = -100
    weights = [torch.rand(rows, generator=g, dtype=torch.float64) for _ in range(3)]
    return pred_hidden, pred_weight, target_hidden, target_weight, labels, weights


def weighted_loss(out, weights, terms=("divergence", "pred_ce", "target_ce")):
    """Σ_i a_i·out_i over the asked terms, each with its own per-row weights (as DWA-KD's weights would be)."""
    total = 0.0
    for name, w in zip(("divergence", "pred_ce", "target_ce"), weights, strict=True):
        value = getattr(out, name)
        if name in terms and value is not None:
            total = total + (value * w.to(value.dtype)).sum()
    return total


def grads(loss, tensors):
    needed = [t for t in tensors if t.requires_grad]
    got = iter(torch.autograd.grad(loss, needed, allow_unused=True))
    return [next(got) if t.requires_grad else None for t in tensors]


def assert_close_grads(got, want, **tol):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
            continue
        g = torch.zeros_like(w) if g is None else g
        torch.testing.assert_close(g, w, **tol)


# ---- the reference against the independent chunked logits op and the token-weight statistics -------------------
@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_reference_divergence_matches_logits_op(kind, tau):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(7, 23, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 23, generator=g, dtype=torch.float64) * 2
    w = torch.rand(7, generator=g, dtype=torch.float64)
    want = logits_divergence(s, t, kind, tau)
    got = reference_divergence(s, t, kind, tau)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad((got * w).sum(), s)
    (g_want,) = torch.autograd.grad((want * w).sum(), s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_reference_statistics_match_token_weights():
    pred_hidden, pred_weight, target_hidden, target_weight, *_ = make_case()
    out = head_kd_reference(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=VOCAB,
                            statistics=STATISTICS)
    with torch.no_grad():
        logits = target_hidden @ target_weight.T  # (rows, head rows): padding rows are cut by vocab_size
    torch.testing.assert_close(out.target_entropy / math.log(VOCAB), normalized_entropy(logits, vocab_size=VOCAB))
    torch.testing.assert_close(out.target_peak, peak_probability(logits, vocab_size=VOCAB))
    assert torch.equal(out.target_argmax, logits[:, :VOCAB].argmax(-1))


# ---- fused == reference ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("backward", ["recompute", "store"])
def test_fused_matches_reference_float64(kind, tau, backward):
    """Every divergence, both temperatures and backward modes: values, statistics and all gradients."""
    case = make_case(pred_head_grad=backward == "recompute")
    pred_hidden, pred_weight, target_hidden, target_weight, labels, weights = case
    kw = dict(vocab_size=VOCAB, divergence=kind, temperature=tau, pred_labels=labels, target_labels=labels,
              statistics=STATISTICS)
    fused = fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, **SIZES,
                          backward=backward, **kw)
    ref = head_kd_reference(pred_hidden, pred_weight, target_hidden, target_weight, **kw)
    for name in ("divergence", "pred_ce", "target_ce", "pred_entropy", "pred_peak", "target_entropy", "target_peak"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(fused.pred_argmax, ref.pred_argmax) and torch.equal(fused.target_argmax, ref.target_argmax)
    assert fused.pred_ce[2] == 0 and fused.target_ce[2] == 0  # the ignored label
    inputs = [pred_hidden, pred_weight, target_hidden]
    got = grads(weighted_loss(fused, weights), inputs)
    want = grads(weighted_loss(ref, weights), inputs)
    assert_close_grads(got, want, rtol=1e-9, atol=1e-11)
    if got[1] is not None:
        assert torch.count_nonzero(got[1][VOCAB:]) == 0  # padding head rows get no gradient
        assert torch.count_nonzero(got[1][:VOCAB]) > 0


@pytest.mark.parametrize("terms", [("divergence",), ("pred_ce",), ("target_ce",), ("divergence", "target_ce")])
@pytest.mark.parametrize("backward", ["recompute", "store"])
def test_each_term_alone(terms, backward):
    """With only some outputs asked for (and only those used), the others are None and gradients still match."""
    case = make_case(pred_head_grad=backward == "recompute")
    pred_hidden, pred_weight, target_hidden, target_weight, labels, weights = case
    kw = dict(vocab_size=VOCAB, divergence="js" if "divergence" in terms else None, temperature=1.5,
              pred_labels=labels if "pred_ce" in terms else None,
              target_labels=labels if "target_ce" in terms else None)
    fused = fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, **SIZES,
                          backward=backward, **kw)
    ref = head_kd_reference(pred_hidden, pred_weight, target_hidden, target_weight, **kw)
    for name in ("divergence", "pred_ce", "target_ce"):
        assert (getattr(fused, name) is None) == (name not in terms)
    assert fused.pred_entropy is None and fused.target_argmax is None
    inputs = [pred_hidden, pred_weight, target_hidden]
    assert_close_grads(grads(weighted_loss(fused, weights, terms), inputs),
                       grads(weighted_loss(ref, weights, terms), inputs), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", STATISTICS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_each_statistic_alone(name, tau):
    """A statistic asked for alone (no CE, no entropy on its side) is read from the logits, not from τ log-probs."""
    pred_hidden, pred_weight, target_hidden, target_weight, *_ = make_case()
    kw = dict(vocab_size=VOCAB, divergence="fkl", temperature=tau, statistics=(name,))
    fused = fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, **SIZES, **kw)
    ref = head_kd_reference(pred_hidden, pred_weight, target_hidden, target_weight, **kw)
    torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=1e-10, atol=1e-12)
    assert all(getattr(fused, other) is None for other in STATISTICS if other != name)


def test_ce_only_without_target_and_ce_temperature():
    """Prediction CE alone (the student CE, MinED's one-hot rows at τ) with statistics, no target side."""
    pred_hidden, pred_weight, _, _, labels, weights = make_case()
    kw = dict(vocab_size=VOCAB, divergence=None, pred_labels=labels, ce_temperature=2.0,
              statistics=("pred_entropy", "pred_peak"))
    fused = fused_head_kd(pred_hidden, pred_weight, **SIZES, **kw)
    ref = head_kd_reference(pred_hidden, pred_weight, **kw)
    torch.testing.assert_close(fused.pred_ce, ref.pred_ce)
    torch.testing.assert_close(fused.pred_entropy, ref.pred_entropy)
    got = grads((fused.pred_ce * weights[1]).sum(), [pred_hidden, pred_weight])
    want = grads((ref.pred_ce * weights[1]).sum(), [pred_hidden, pred_weight])
    assert_close_grads(got, want, rtol=1e-9, atol=1e-11)


def test_target_bias_and_shared_head():
    """MinED-style target (a bias of −1e5 on unmapped tokens) and the t2s layout (one head on both sides)."""
    pred_hidden, pred_weight, _, _, labels, weights = make_case()
    bias = torch.zeros(HEAD_ROWS, dtype=torch.float64)
    bias[::3] = -1e5
    projected = torch.randn(ROWS, D_PRED, dtype=torch.float64, requires_grad=True)  # t2s hidden, student width
    for kind in ("fkl", "rkl", "js"):
        kw = dict(vocab_size=VOCAB, divergence=kind, temperature=2.0, pred_labels=labels, target_labels=labels,
                  target_bias=bias)
        fused = fused_head_kd(pred_hidden, pred_weight, projected, pred_weight.detach(), **SIZES, **kw)
        ref = head_kd_reference(pred_hidden, pred_weight, projected, pred_weight.detach(), **kw)
        torch.testing.assert_close(fused.divergence, ref.divergence, rtol=1e-10, atol=1e-10)
        inputs = [pred_hidden, pred_weight, projected]
        assert_close_grads(grads(weighted_loss(fused, weights), inputs), grads(weighted_loss(ref, weights), inputs),
                           rtol=1e-9, atol=1e-11)


def test_fp32_matches_float64_reference():
    """fp32 inputs: the fused op within fp32 round-off of the float64 reference (explicit tolerances)."""
    case64 = make_case(scale=0.7)
    pred_hidden, pred_weight, target_hidden, target_weight, labels, weights = case64
    as32 = [t.detach().float().requires_grad_(t.requires_grad) for t in case64[:4]]
    for kind in DIVERGENCES:
        kw = dict(vocab_size=VOCAB, divergence=kind, temperature=2.0, pred_labels=labels, target_labels=labels)
        fused = fused_head_kd(*as32, **SIZES, **kw)
        ref = head_kd_reference(pred_hidden, pred_weight, target_hidden, target_weight, **kw)
        assert fused.divergence.dtype == torch.float32
        torch.testing.assert_close(fused.divergence.double(), ref.divergence, rtol=1e-4, atol=2e-6)
        torch.testing.assert_close(fused.pred_ce.double(), ref.pred_ce, rtol=1e-5, atol=1e-5)
        got = grads(weighted_loss(fused, weights), [as32[0], as32[1], as32[2]])
        want = grads(weighted_loss(ref, weights), [pred_hidden, pred_weight, target_hidden])
        assert_close_grads([g.double() for g in got], want, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_follows_the_reference():
    """Under bf16 autocast both run the head matmul in bf16 (bf16 logits) and everything after it in fp32: the
    fused op stays within a small fraction of the bf16-vs-fp32 gap of the reference."""
    case = make_case(dtype=torch.float32, scale=0.5)
    pred_hidden, pred_weight, target_hidden, target_weight, labels, weights = case
    inputs = [pred_hidden, pred_weight, target_hidden]
    kw = dict(vocab_size=VOCAB, divergence="fkl", temperature=2.0, pred_labels=labels, target_labels=labels,
              statistics=("pred_entropy", "target_peak"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight.detach(), **SIZES,
                              **kw)
        ref = head_kd_reference(pred_hidden, pred_weight, target_hidden, target_weight, **kw)
        g_fused = grads(weighted_loss(fused, weights), inputs)
        g_ref = grads(weighted_loss(ref, weights), inputs)
    exact = head_kd_reference(pred_hidden, pred_weight, target_hidden, target_weight, **kw)
    assert fused.divergence.dtype == torch.float32 and fused.target_peak.dtype == torch.float32
    for name in ("divergence", "pred_ce", "target_ce", "pred_entropy", "target_peak"):
        a, b, c = getattr(fused, name), getattr(ref, name), getattr(exact, name)
        gap = (b - c).abs().max()
        assert gap > 1e-4, f"{name}: bf16 autocast made no difference; the test would not see it ignored"
        assert (a - b).abs().max() <= 0.05 * gap + 1e-6, name
    for got, want in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


# ---- edge cases, autograd and memory contracts -------------------------------------------------------------------
@pytest.mark.parametrize("backward", ["recompute", "store"])
def test_empty_rows(backward):
    case = make_case(rows=0, pred_head_grad=backward == "recompute")
    pred_hidden, pred_weight, target_hidden, target_weight, labels, _ = case
    out = fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=VOCAB, divergence="akl",
                        pred_labels=labels, target_labels=labels, statistics=STATISTICS, backward=backward)
    assert out.divergence.shape == (0,) and out.target_argmax.shape == (0,)
    loss = out.divergence.sum() + out.pred_ce.sum() + out.target_ce.sum()
    loss.backward()
    assert pred_hidden.grad is None or pred_hidden.grad.shape == (0, D_PRED)
    if backward == "recompute":
        assert pred_weight.grad is not None and torch.count_nonzero(pred_weight.grad) == 0


@pytest.mark.parametrize("kind", [k for k in DIVERGENCES if k != "akl"])  # akl's gap weights are constants
@pytest.mark.parametrize("backward", ["recompute", "store"])
def test_gradcheck_float64(kind, backward):
    g = torch.Generator().manual_seed(3)
    head_grad = backward == "recompute"
    pred_hidden = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pred_weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=head_grad)
    target_hidden = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target_weight = torch.randn(7, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 4, 0])

    fixed_target = target_hidden.detach().clone()

    def fn(ph, pw, th):
        # the divergence treats its target as fixed (no gradient to it), so it reads a copy that gradcheck does not
        # perturb; the target CE, which has a gradient, reads the perturbed input
        kw = dict(vocab_size=6, chunk_elements=12, backward=backward)
        div = fused_head_kd(ph, pw, fixed_target, target_weight, divergence=kind, temperature=1.7, **kw)
        ce = fused_head_kd(ph, pw, th, target_weight, divergence=None, pred_labels=labels, target_labels=labels,
                           ce_temperature=1.3, **kw)
        return div.divergence, ce.pred_ce, ce.target_ce

    assert torch.autograd.gradcheck(fn, (pred_hidden, pred_weight, target_hidden))


@pytest.mark.parametrize("backward", ["recompute", "store"])
def test_nothing_rows_by_vocab_is_saved_for_backward(backward):
    """Saved tensors are the op's inputs (recompute) or (rows, hidden) gradients (store), never (rows, V)."""
    rows, vocab = 64, 4096
    g = torch.Generator().manual_seed(4)
    pred_hidden = torch.randn(rows, 8, generator=g, requires_grad=True)
    pred_weight = torch.randn(vocab + 3, 8, generator=g, requires_grad=backward == "recompute")
    target_hidden = torch.randn(rows, 8, generator=g, requires_grad=True)
    target_weight = torch.randn(vocab + 3, 8, generator=g)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    inputs = {t.data_ptr() for t in (pred_hidden, pred_weight, target_hidden, target_weight, labels)}
    saved: list[tuple[tuple[int, ...], bool]] = []

    def pack(t):
        saved.append((tuple(t.shape), t.data_ptr() in inputs))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=vocab,
                            divergence="fkl", pred_labels=labels, target_labels=labels, statistics=STATISTICS,
                            chunk_elements=16 * vocab, backward=backward)
    (out.divergence.sum() + out.pred_ce.sum() + out.target_ce.sum()).backward()
    assert saved, "the op saved nothing: the hook did not see it"
    for shape, is_input in saved:
        assert is_input or math.prod(shape) <= rows * 8, f"saved a {shape} intermediate"
        assert shape != (rows, vocab)


@pytest.mark.parametrize("shared_head", [False, True])
def test_peak_memory_is_a_chunk_not_the_batch(shared_head):
    """Allocator peak of forward + backward: well under one full (rows, V) fp32 tensor for the fused op (chunks of
    rows/16), while the dense reference holds several of them. `shared_head`: one head on both sides (the t2s and
    s2t layout), where one matmul forms both sides' logits."""
    rows, vocab = 256, 8192
    g = torch.Generator().manual_seed(5)
    pred_hidden = torch.randn(rows, 16, generator=g, requires_grad=True)
    pred_weight = torch.randn(vocab, 16, generator=g, requires_grad=True)
    target_hidden = torch.randn(rows, 16, generator=g, requires_grad=True)
    target_weight = pred_weight.detach() if shared_head else torch.randn(vocab, 16, generator=g)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    full = rows * vocab * 4
    head_grad = pred_weight.numel() * 4

    def run(fn, **extra):
        out = fn(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=vocab, divergence="fkl",
                 temperature=2.0, pred_labels=labels, target_labels=labels, statistics=("pred_entropy", "target_peak"),
                 **extra)
        (out.divergence.sum() + out.pred_ce.sum() + out.target_ce.sum()).backward()

    _, fused = peak_bytes(lambda: run(fused_head_kd, chunk_elements=16 * vocab, block_elements=4 * vocab))
    _, dense = peak_bytes(lambda: run(head_kd_reference))
    assert fused - head_grad < 0.5 * full, (fused, full)
    assert dense > 4 * full, (dense, full)


@pytest.mark.parametrize("side", ["pred", "target"])
def test_entropy_at_another_temperature_adds_no_block_temporary_on_cpu(side):
    """DWA-KD's τ = 1 entropies next to a τ = 2 divergence: on CPU they come from the logits in one numba pass
    (`ops.row_stats`), so asking for them leaves the allocator peak where it is without them (a log-softmax + exp
    path holds one or two (block rows, V) temporaries more: the KD terms' peak at paper shapes was 1.4 % higher)."""
    rows, vocab = 64, 3000
    g = torch.Generator().manual_seed(9)
    pred_hidden = torch.randn(rows, 16, generator=g, requires_grad=True)
    pred_weight = torch.randn(vocab, 16, generator=g)
    target_hidden = torch.randn(rows, 16, generator=g)
    target_weight = torch.randn(vocab, 16, generator=g)

    def run(statistics):
        out = fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=vocab,
                            divergence="fkl", temperature=2.0, statistics=statistics,
                            chunk_elements=rows * vocab, block_elements=16 * vocab)
        out.divergence.sum().backward()
        return out

    _, without = peak_bytes(lambda: run(()))
    out, with_entropy = peak_bytes(lambda: run((f"{side}_entropy", f"{side}_peak")))
    block = 16 * vocab * 4
    assert with_entropy - without < block // 4, (with_entropy, without, block)
    z = F.linear(pred_hidden if side == "pred" else target_hidden, pred_weight if side == "pred" else target_weight)
    torch.testing.assert_close(getattr(out, f"{side}_entropy"), -(z.softmax(-1) * z.log_softmax(-1)).sum(-1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(getattr(out, f"{side}_peak"), z.softmax(-1).amax(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backward", ["store", "recompute"])
def test_one_chunk_of_logits_alive_at_a_time(backward):
    """Chunks are formed one after another and each is freed before the next: the op's peak is one chunk of both
    sides' logits plus small buffers (a loop variable holding a view of the previous chunk kept two alive)."""
    rows, vocab, dim = 96, 4000, 16
    g = torch.Generator().manual_seed(6)
    pred_hidden = torch.randn(rows, dim, generator=g, requires_grad=True)
    target_hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g)

    def run():
        out = fused_head_kd(pred_hidden, weight, target_hidden, weight, vocab_size=vocab, divergence="fkl",
                            backward=backward, chunk_elements=32 * vocab, block_elements=8 * vocab)  # 3 chunks
        out.divergence.sum().backward()

    _, peak = peak_bytes(run)
    chunk = 2 * 32 * vocab * 4  # both sides' fp32 logits of 32 rows, stacked
    assert peak < 1.5 * chunk, (peak, chunk)


def test_bf16_autocast_holds_no_16_bit_copy_of_a_chunk():
    """Under bf16 autocast the chunk's 16-bit product is promoted slice by slice (`functional.LOGIT_SLICES`): the
    forward's peak stays within a fraction of a chunk above its fp32 peak (the whole-chunk bf16 product next to its
    fp32 promotion was half a chunk more), and the values are those of the whole-chunk product."""
    rows, vocab, dim = 64, 3000, 16
    g = torch.Generator().manual_seed(4)
    pred_hidden, target_hidden = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g)

    def run(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return fused_head_kd(pred_hidden, weight, target_hidden, weight, vocab_size=vocab, divergence="fkl",
                                 chunk_elements=rows * vocab, block_elements=16 * vocab)

    _, fp32_peak = peak_bytes(lambda: run(False))
    out, bf16_peak = peak_bytes(lambda: run(True))
    chunk = 2 * rows * vocab * 4  # both sides' fp32 logits, stacked (one head)
    assert bf16_peak - fp32_peak < chunk // 4, (bf16_peak, fp32_peak, chunk)  # the head's bf16 copy: chunk / 16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_s, z_t = F.linear(pred_hidden, weight).float(), F.linear(target_hidden, weight).float()
    expected = (F.softmax(z_t, -1) * (F.log_softmax(z_t, -1) - F.log_softmax(z_s, -1))).sum(-1)
    torch.testing.assert_close(out.divergence, expected, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_head_gradient_holds_no_whole_product():
    """A trained fp32 head under bf16 autocast (recompute backward): each chunk's bf16 head-gradient product is added
    into the fp32 gradient slice by slice. Whole, it and its fp32 promotion put the bf16 peak 2.5 head gradients
    above the fp32 one here (1.3 with the slices: the chunk's bf16 copies for the matmuls). The gradient is the
    reference's to bf16 rounding."""
    rows, vocab, dim = 64, 8000, 16
    g = torch.Generator().manual_seed(5)
    pred_hidden = torch.randn(rows, dim, generator=g, requires_grad=True)
    target_hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g)
    head = weight.clone().requires_grad_(True)

    def run(autocast: bool):
        head.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fused_head_kd(pred_hidden, head, target_hidden, weight, vocab_size=vocab, divergence="fkl",
                                backward="recompute", chunk_elements=rows * vocab, block_elements=16 * vocab)
        out.divergence.sum().backward()

    _, fp32_peak = peak_bytes(lambda: run(False))
    _, bf16_peak = peak_bytes(lambda: run(True))
    head_grad = vocab * dim * 4
    assert bf16_peak - fp32_peak < 2 * head_grad, (bf16_peak, fp32_peak, head_grad)
    sliced = head.grad.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_s, z_t = F.linear(pred_hidden, head).float(), F.linear(target_hidden, weight).float()
    head.grad = None
    (F.softmax(z_t, -1) * (F.log_softmax(z_t, -1) - F.log_softmax(z_s, -1))).sum().backward()
    torch.testing.assert_close(sliced, head.grad, rtol=2e-2, atol=2e-2)


def test_bad_arguments_are_named():
    pred_hidden, pred_weight, target_hidden, target_weight, labels, _ = make_case()
    with pytest.raises(ValueError, match="target head is fixed"):
        fused_head_kd(pred_hidden, pred_weight, pred_hidden, pred_weight, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=HEAD_ROWS + 1)
    with pytest.raises(ValueError, match="unknown divergence"):
        fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=VOCAB, divergence="kl")
    with pytest.raises(ValueError, match="unknown statistics"):
        fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=VOCAB, statistics=["H"])
    with pytest.raises(ValueError, match="store"):
        fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=VOCAB, backward="store")
    with pytest.raises(ValueError, match="pred_labels"):
        fused_head_kd(pred_hidden, pred_weight, target_hidden, target_weight, vocab_size=VOCAB,
                      pred_labels=labels[:3])
