"""Offline teacher (`dwakd teacher-cache`, `teacher.cache`): encodings, equality with the live teacher, refusals,
resume.

References are independent of the implementation: float16 rounding by `math.frexp` in float64, bit packing by a
Python loop over bits, the tail value by solving the mass equation in float64 per row, and — for the methods — the
live teacher itself, run by the trainer on the same batch.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dwakd.config import ConfigError, load_config
from dwakd.run import build_training
from dwakd.teacher_cache import (
    CacheSettings,
    TeacherCache,
    TeacherCacheError,
    build_teacher_cache,
    topk_to_logits,
    verify_cache,
)
from dwakd.teacher_cache.builder import CacheBuilder
from dwakd.teacher_cache.format import (
    decode_neg_logp,
    decode_topk,
    encode_neg_logp,
    encode_topk,
    pack_bits,
    unpack_bits,
)
from dwakd.trainer import DistillationModel

REPO = Path(__file__).resolve().parents[1]
FAST = ["data.max_length=64", "data.max_prompt_length=32", "data.eval=null", "data.max_train_examples=4",
        "training.per_device_train_batch_size=4", "training.max_steps=1", "training.logging_steps=1"]
EQUALITY_METHODS = ["dskd", "dwakd", "uld", "mined", "multilevel_ot", "dskdv2"]
DEFAULT_EQUALITY = {"dskd", "dwakd"}  # the rest with -m slow (each builds a run with a 151k-token teacher)


# ---- encodings ----------------------------------------------------------------------------------------------------
def _round_half_mantissa(x: float, mantissa_bits: int) -> float:
    """Nearest value with `mantissa_bits` explicit mantissa bits and float16's exponent range (float64 reference)."""
    if x == 0 or math.isinf(x):
        return x
    _, exponent = math.frexp(x)  # x = f·2^e, 0.5 ≤ f < 1
    exponent = max(exponent, -13)  # float16 subnormals: fixed spacing below 2^−14
    step = 2.0 ** (exponent - 1 - mantissa_bits)
    return round(x / step) * step  # ties to even, like the float16 conversion


@pytest.mark.parametrize("value_bits", [15, 13, 10])
def test_value_codes_round_like_float16_with_fewer_mantissa_bits(value_bits):
    rng = np.random.default_rng(value_bits)
    x = np.concatenate([rng.exponential(3.0, 2000), rng.uniform(0, 1e-3, 200), [0.0, 1e-7, 40.0, np.inf]])
    x = x.astype(np.float32)
    got = decode_neg_logp(encode_neg_logp(x, value_bits), value_bits)
    mantissa = value_bits - 5
    for value, decoded in zip(x.tolist(), got.tolist()):
        # two roundings (to float16, then to fewer bits) may differ from one by one unit in the last place
        want = _round_half_mantissa(_round_half_mantissa(value, 10), mantissa)
        if math.isinf(value):
            assert math.isinf(decoded)
            continue
        ulp = 2.0 ** (math.frexp(max(value, 2**-14))[1] - 1 - mantissa)
        assert abs(decoded - want) <= ulp * 1.0001, (value, decoded, want)
        assert abs(decoded - value) <= ulp * 0.5 + 2.0 ** (math.frexp(max(value, 2**-14))[1] - 11), value
    if value_bits == 15:
        assert np.array_equal(got[np.isfinite(x)], x[np.isfinite(x)].astype(np.float16).astype(np.float32))


def test_bit_packing_against_a_bit_loop():
    rng = np.random.default_rng(0)
    width, k = 31, 5
    entries = rng.integers(0, 2**width, (3, k), dtype=np.uint64)
    packed = pack_bits(entries, width)
    assert packed.shape == (3, math.ceil(k * width / 8))
    for r in range(3):
        bits = [(int(entries[r, j]) >> b) & 1 for j in range(k) for b in range(width)]
        want = [sum(bits[8 * i + b] << b for b in range(8) if 8 * i + b < len(bits)) for i in range(packed.shape[1])]
        assert packed[r].tolist() == want
    assert np.array_equal(unpack_bits(packed, k, width), entries)
    logp = -rng.exponential(4.0, (3, k)).astype(np.float32)
    ids = rng.integers(0, 151646, (3, k))
    got_logp, got_ids = decode_topk(encode_topk(logp, ids, 13, 18), k, 13, 18)
    assert np.array_equal(got_ids, ids)
    assert np.allclose(got_logp, logp, rtol=2.0**-8, atol=0)


VOCAB, WIDTH, K, TAU = 50, 53, 6, 2.0  # 3 head padding rows


def _topk_rows(seed: int):
    """4 random rows over VOCAB in float64: logits z, their log-sum-exp, the top-K ids and log-probabilities, the
    tail mask and the true log tail mass at TAU."""
    z = np.random.default_rng(seed).normal(0, 3, (4, VOCAB))
    lse = np.log(np.exp(z).sum(-1))
    ids = np.argsort(-z, -1)[:, :K]
    logp = np.take_along_axis(z, ids, -1) - lse[:, None]
    tail_mask = np.ones_like(z, dtype=bool)
    np.put_along_axis(tail_mask, ids, False, -1)
    log_tail = np.log((np.exp(z / TAU) * tail_mask).sum(-1)) - np.log(np.exp(z / TAU).sum(-1))
    return z, lse, ids, logp, tail_mask, log_tail


def test_topk_rows_keep_the_top_entries_and_the_tail_mass():
    vocab, width, tau = VOCAB, WIDTH, TAU
    z, lse, ids, logp, tail_mask, log_tail = _topk_rows(1)
    out = topk_to_logits(torch.tensor(logp), torch.tensor(ids), torch.tensor(log_tail), vocab, width, tau).double()
    for r in range(4):
        row = out[r].numpy()
        assert np.allclose(row[ids[r]], logp[r], atol=1e-6)  # the top k as given (log-probabilities)
        tail_values = row[:vocab][tail_mask[r]]
        assert np.ptp(tail_values) == 0  # one tail bucket, spread evenly
        p = np.exp(row[:vocab] / tau - np.log(np.exp(row[:vocab] / tau).sum()))
        assert p[tail_mask[r]].sum() == pytest.approx(math.exp(log_tail[r]), rel=1e-5)  # the stored tail mass at τ
        assert np.all(row[vocab:] < -1e29)  # head padding rows carry no mass
    with pytest.raises(Exception):  # noqa: B017 - sanity: a wrong width is caught by scatter
        topk_to_logits(torch.tensor(logp), torch.tensor(ids) + width, torch.tensor(log_tail), vocab, width, tau)


def test_topk_rows_with_a_tail_shape_follow_it_with_the_stored_mass(monkeypatch):
    """A rank-R tail hands topk_to_logits the row's tail shape: the tail follows it up to one constant, carries the
    stored mass at τ, and the true logits as the shape give back the true row (float64 reference)."""
    vocab, tau = VOCAB, TAU
    z, lse, ids, logp, tail_mask, log_tail = _topk_rows(2)
    args = (torch.tensor(logp), torch.tensor(ids), torch.tensor(log_tail), vocab, WIDTH, tau)

    def tail(shape):  # the shape as coefficients on the identity basis (the cache stores R ≪ V of them)
        return torch.zeros(vocab), torch.tensor(shape), torch.eye(vocab)

    out = topk_to_logits(*args, tail=tail(z)).double().numpy()
    assert np.allclose(out[:, :vocab], z - lse[:, None], atol=1e-5)  # the true row, as log-probabilities
    shape = np.random.default_rng(3).normal(0, 1, (4, vocab))
    out = topk_to_logits(*args, tail=tail(shape)).double().numpy()
    whole = topk_to_logits(*args, tail=tail(shape))  # so few rows: all in one step
    monkeypatch.setattr("dwakd.teacher_cache.view.SHAPE_CHUNK_BYTES", 4 * vocab)  # one row per step, as on CPU
    torch.testing.assert_close(topk_to_logits(*args, tail=tail(shape)), whole, rtol=0, atol=0)
    for r in range(4):
        row = out[r, :vocab]
        assert np.allclose(row[ids[r]], logp[r], atol=1e-6)
        assert np.ptp(row[tail_mask[r]] - shape[r][tail_mask[r]]) < 1e-5  # the shape, shifted by one constant
        p = np.exp(row / tau - np.log(np.exp(row / tau).sum()))
        assert p[tail_mask[r]].sum() == pytest.approx(math.exp(log_tail[r]), rel=1e-5)
        assert np.all(out[r, vocab:] < -1e29)


# ---- fixtures -----------------------------------------------------------------------------------------------------
def _yaml(folder: Path, data_file: Path | None = None) -> Path:
    tree = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    tree["data"]["train"] = str(data_file or REPO / tree["data"]["train"])
    tree["data"]["eval"] = None
    tree["training"]["disable_tqdm"] = True
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _config(yaml_path: Path, out: Path, *overrides: str):
    return load_config(yaml_path, [f"output_dir={out}", *FAST, *overrides])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A lossless, a head-mode and a top-k cache (flat tail) of the same 4 examples (tiny recipe, Qwen vocabulary),
    and the config file."""
    root = tmp_path_factory.mktemp("teacher-cache")
    path = _yaml(root)
    config = _config(path, root / "unused")
    lossless = root / "lossless"
    build_teacher_cache(config, lossless, CacheSettings(k=None), show_progress=False)
    topk = root / "topk"
    build_teacher_cache(config, topk, CacheSettings(k=64, layers=(1,), tail_rank=0), show_progress=False)
    head = root / "head"
    build_teacher_cache(config, head, CacheSettings(k="head"), show_progress=False)
    return {"yaml": path, "lossless": lossless, "topk": topk, "head": head, "root": root}


def _loss_and_grads(model, batch):
    model.eval()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(**batch)
    out["loss"].backward()
    values = {"loss": float(out["loss"].detach())} | {k: float(v) for k, v in out["parts"].items()}
    return values, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- lossless and head mode == live teacher ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lossless", "head"])
@pytest.mark.parametrize("method", [m if m in DEFAULT_EQUALITY else pytest.param(m, marks=pytest.mark.slow)
                                    for m in EQUALITY_METHODS])
def test_lossless_cache_gives_the_live_teachers_loss_parts_and_gradients(caches, tmp_path, method, kind):
    """The same student and method (shared objects), the same collated batch: live teacher vs the cached one (every
    logit stored, or recomputed from the cached final hidden state with the cached head)."""
    live = build_training(_config(caches["yaml"], tmp_path, f"method={method}"), show_progress=False)
    cache = TeacherCache(caches[kind])
    teacher = cache.teacher_module()
    teacher.configure_for(live.model.method)
    assert not any("layers" in name for name, _ in teacher.named_parameters())  # no transformer blocks
    cached = DistillationModel(live.model.student, live.model.method, teacher, live.model.student_vocab_size,
                               live.model.teacher_vocab_size)
    batch = cache.collator(live.trainer.data_collator)([live.train_dataset[i] for i in range(4)])
    assert any(key.startswith("teacher_cache_") for key in batch)
    want, want_grads = _loss_and_grads(live.model, batch)  # the live model ignores the cache keys
    got, got_grads = _loss_and_grads(cached, batch)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _log(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e]


def test_training_from_cache_with_accumulation_and_resume_equals_live(caches, tmp_path):
    """4 optimizer steps of 2 accumulated micro-batches: live teacher == lossless cache, and a run resumed from the
    cache-trained checkpoint-2 logs the same steps 3-4."""
    common = ["method=dskd", "data.max_train_examples=4", "training.per_device_train_batch_size=1",
              "training.gradient_accumulation_steps=2", "training.max_steps=4", "training.save_strategy=steps",
              "training.save_steps=2"]
    runs = {}
    for name, extra in (("live", []), ("cached", [f"teacher.cache={caches['lossless']}"])):
        config = _config(caches["yaml"], tmp_path / name, *common, *extra)
        from dwakd.run import train

        train(config, show_progress=False)
        runs[name] = _log(tmp_path / name)
    resumed_config = _config(caches["yaml"], tmp_path / "resumed", *common, f"teacher.cache={caches['lossless']}",
                             f"training.resume_from_checkpoint={tmp_path / 'cached' / 'checkpoint-2'}")
    from dwakd.run import train

    train(resumed_config, show_progress=False)
    # the resumed run's history holds the checkpoint's steps 1-2 (restored with the trainer state) and its own 3-4
    runs["resumed"] = [e for e in _log(tmp_path / "resumed") if e["step"] > 2]
    # it resumed (a fresh run with the same seeds would log the same values, but save checkpoint-2 as well)
    assert not (tmp_path / "resumed" / "checkpoint-2").exists() and (tmp_path / "resumed" / "checkpoint-4").is_dir()
    assert [e["step"] for e in runs["live"]] == [e["step"] for e in runs["cached"]] == [1, 2, 3, 4]
    assert [e["step"] for e in runs["resumed"]] == [3, 4]
    for key in ("loss", "ce", "t2s_ce", "t2s_kd", "s2t_kd"):
        for a, b in zip(runs["live"], runs["cached"]):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a["step"])
        for a, b in zip(runs["cached"][2:], runs["resumed"]):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a["step"])


# ---- top-k mode -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dwakd", *(pytest.param(m, marks=pytest.mark.slow)
                                               for m in ("dskd", "uld", "mined", "dskdv2", "dwakdv2"))])
def test_topk_cache_trains_every_distribution_method(caches, tmp_path, method):
    config = _config(caches["yaml"], tmp_path, f"method={method}", f"teacher.cache={caches['topk']}")
    run = build_training(config, show_progress=False)
    batch = next(iter(run.trainer.get_train_dataloader()))
    values, grads = _loss_and_grads(run.model, batch)
    assert all(math.isfinite(v) for v in values.values()) and grads


def _teacher_views(caches, tmp_path, method: str, cache_dir: Path):
    """A live run and a cached run of `method` on the cached run's first batch: (cached run, batch, teacher view,
    the live teacher's ModelView, the cached teacher's ModelView)."""
    from dwakd.interface import TokenView

    live = build_training(_config(caches["yaml"], tmp_path / "live", f"method={method}"), show_progress=False)
    cached = build_training(_config(caches["yaml"], tmp_path / "cached", f"method={method}",
                                    f"teacher.cache={cache_dir}"), show_progress=False)
    batch = next(iter(cached.trainer.get_train_dataloader()))
    view = TokenView(*(batch[f"teacher_{k}"] for k in ("input_ids", "attention_mask", "labels", "input_offsets",
                                                        "label_offsets")))
    with torch.no_grad():
        dense = live.model._run_side("teacher", live.model.teacher, view, True, live.model.teacher_vocab_size)
        stored = cached.model.teacher.model_view(batch, view, cached.model.teacher_vocab_size)
    return cached, batch, view, dense, stored


def test_topk_cache_is_close_to_the_dense_teacher_and_exact_in_its_top_entries(caches, tmp_path):
    cached, batch, view, dense, sparse = _teacher_views(caches, tmp_path, "dskd", caches["topk"])
    assert cached.model.teacher.tail_temperature == 2.0  # dskd's kd_temperature, one of the stored temperatures
    with torch.no_grad():
        want, _ = dense.label_logits(view)
        got, _ = sparse.label_logits(view)
    vocab = cached.model.teacher_vocab_size
    want = want[:, :vocab].double()
    got = got[:, :vocab].double()
    top = want.topk(64, -1).indices
    p_want = torch.log_softmax(want, -1)
    assert torch.allclose(got.gather(1, top), p_want.gather(1, top), atol=0.05)  # 13-bit codes of −log p
    # At τ_c = 2 the tail bucket holds the true tail mass, so by the chain rule of KL the whole error is the tail's
    # shape: KL(p ‖ p̂) = M·KL(p_tail / M ‖ uniform) (+ the top-k value codes' rounding). This random-init teacher's
    # rows are nearly uniform: almost all mass is in the tail (the worst case; docs/teacher-cache.md#accuracy).
    lp, lq = torch.log_softmax(want / 2.0, -1), torch.log_softmax(got / 2.0, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    tail = torch.ones_like(want, dtype=torch.bool).scatter_(1, top, False)
    mass = (lp.exp() * tail).sum(-1)
    tail_logp = torch.where(tail, lp - mass.log().unsqueeze(-1), torch.zeros_like(lp))
    shape_kl = (tail_logp.exp() * tail * (tail_logp + math.log(vocab - 64))).sum(-1)
    torch.testing.assert_close(kl, mass * shape_kl, rtol=0, atol=2e-4)
    torch.testing.assert_close((lq.exp() * tail).sum(-1), mass, rtol=1e-5, atol=0)
    # the cached hidden states are the live ones at the label positions (float16 storage)
    mask = view.label_mask
    torch.testing.assert_close(sparse.last_hidden[mask].float(), dense.last_hidden[mask].float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(sparse.hidden_states[1][mask].float(), dense.hidden_states[1][mask].float(),
                               rtol=2e-3, atol=2e-3)
    with pytest.raises(TeacherCacheError, match="--layers 0"):
        sparse.hidden_states[0]


def _kl_to_dense(caches, tmp_path, cache_dir: Path, tau: float = 2.0) -> torch.Tensor:
    """Per teacher token KL(p_τ ‖ p̂_τ) of a cache's rows against the live teacher's."""
    cached, _, view, dense, stored = _teacher_views(caches, tmp_path, "dskd", cache_dir)
    with torch.no_grad():
        want, _ = dense.label_logits(view)
        got, _ = stored.label_logits(view)
    vocab = cached.model.teacher_vocab_size
    lp = torch.log_softmax(want[:, :vocab].double() / tau, -1)
    lq = torch.log_softmax(got[:, :vocab].double() / tau, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_a_rank_r_tail_gives_back_the_teachers_tail(caches, tmp_path, caplog):
    """Fitted on every row of the 4 examples with the full rank they support, the basis spans each centred row, so
    the tail comes back up to the int8 coefficient codes: far closer to the live teacher than the flat bucket."""
    config = _config(caches["yaml"], tmp_path / "unused")
    flat = build_teacher_cache(config, tmp_path / "flat", CacheSettings(k=16, tail_rank=0), show_progress=False)
    with caplog.at_level("WARNING"):
        ranked = build_teacher_cache(config, tmp_path / "rank", CacheSettings(k=16, tail_rank=10_000),
                                     show_progress=False)
    rows = ranked["sizes"]["rows"]
    s = ranked["settings"]
    assert s["tail_rank"] == rows - 1 and s["tail_fit"] == {"rows": rows, "examples": 4}  # centred: rank n − 1
    assert "--tail-rank 10000 lowered" in caplog.text
    assert ranked["sizes"]["logit_bytes_per_token"] == flat["sizes"]["logit_bytes_per_token"] + rows - 1 + 4
    kl_flat = _kl_to_dense(caches, tmp_path / "a", tmp_path / "flat")
    kl_rank = _kl_to_dense(caches, tmp_path / "b", tmp_path / "rank")
    assert kl_flat.mean() > 1e-3  # the random-init teacher's tail is not flat enough for one bucket
    assert kl_rank.mean() < kl_flat.mean() / 1000  # measured: 0.0048 vs 3.4e-7
    cache = TeacherCache(tmp_path / "rank")
    assert cache.teacher_module().tail_basis.shape == (rows - 1, cache.manifest["teacher"]["vocab_size"])


def test_tail_rank_needs_a_topk_cache_and_older_caches_have_a_flat_tail(caches, tmp_path):
    for k in (None, "head"):
        with pytest.raises(ValueError, match="tail_rank shapes the tail of a top-k cache"):
            CacheSettings(k=k, tail_rank=8)
    with pytest.raises(ValueError, match="tail_rank must be ≥ 0"):
        CacheSettings(tail_rank=-1)
    old = tmp_path / "old"  # a cache written before --tail-rank: neither its request nor its settings name it
    shutil.copytree(caches["topk"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["requested"]["tail_rank"], manifest["settings"]["tail_rank"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    config = _config(caches["yaml"], tmp_path / "unused")
    again = build_teacher_cache(config, old, CacheSettings(k=64, layers=(1,), tail_rank=0), show_progress=False)
    assert again == manifest  # the same request: nothing to rebuild
    assert TeacherCache(old).teacher_module().tail_rank == 0
    with pytest.raises(TeacherCacheError, match="tail_rank: cache 0, now 32"):  # today's default for top-k
        build_teacher_cache(config, old, CacheSettings(k=64, layers=(1,)), show_progress=False)
    assert [CacheSettings(k=k).tail_rank for k in (64, None, "head")] == [32, 0, 0]


def test_topk_cache_refuses_a_method_that_reads_raw_logit_rows(caches, tmp_path):
    config = _config(caches["yaml"], tmp_path, "method=multilevel_ot", f"teacher.cache={caches['topk']}")
    with pytest.raises(ConfigError, match=r"lossless \(--k vocab\) or head-mode \(--k head\) cache"):
        build_training(config, show_progress=False)


# ---- head mode ------------------------------------------------------------------------------------------------------
def test_head_mode_stores_no_logits_and_recomputes_the_live_rows(caches, tmp_path):
    """Head mode: no logit part on disk; the view's rows are the live teacher's, and the fused ops get the head."""
    manifest = json.loads((caches["head"] / "manifest.json").read_text())
    s = manifest["settings"]
    assert (s["logits"], s["lossless"], s["hidden_dtype"]) == ("head", True, "float32")
    d = manifest["teacher"]["hidden_size"]
    assert manifest["sizes"]["logit_bytes_per_token"] == 0 and manifest["sizes"]["hidden_bytes_per_token"] == 4 * d
    from safetensors import safe_open

    with safe_open(str(_shard(caches["head"])), framework="np") as handle:  # the shards hold hidden states only
        assert not any(name in handle.keys() for name in ("logits", "topk", "tail"))
    _, _, view, dense, head = _teacher_views(caches, tmp_path, "dskd", caches["head"])
    with torch.no_grad():
        want, want_index = dense.label_logits(view)
        got, got_index = head.label_logits(view)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_index, want_index)
    weight = head.linear_head_weight()
    assert weight is not None and torch.equal(weight, dense.linear_head_weight())
    rows = torch.nonzero(view.label_mask.reshape(-1)).squeeze(-1)
    torch.testing.assert_close(head.hidden_at(rows), dense.hidden_at(rows), rtol=0, atol=0)
    with pytest.raises(TeacherCacheError, match="label"):
        head.logits_at(torch.tensor([0]))  # a prompt position: a cache has no rows there


def test_head_mode_with_float16_hidden_states_is_close_and_serves_raw_logit_methods(caches, tmp_path):
    config = _config(caches["yaml"], tmp_path / "unused")
    out = tmp_path / "head16"
    manifest = build_teacher_cache(config, out, CacheSettings(k="head", hidden_dtype="float16"), show_progress=False)
    assert manifest["settings"]["lossless"] is False  # float16 of a float32 teacher's states: close, not exact
    assert manifest["sizes"]["hidden_bytes_per_token"] == 2 * manifest["teacher"]["hidden_size"]
    cached, batch, view, dense, head = _teacher_views(caches, tmp_path, "multilevel_ot", out)  # top-k: refused
    with torch.no_grad():
        want = dense.label_logits(view)[0].double()
        got = head.label_logits(view)[0].double()
    assert got.dtype == want.dtype and not torch.equal(got, want)
    lp, lq = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    assert float((lp.exp() * (lp - lq)).sum(-1).max()) < 1e-5  # float16 rounding of d inputs, not a tail model
    values, grads = _loss_and_grads(cached.model, batch)
    assert all(math.isfinite(v) for v in values.values()) and grads


def test_logit_mode_of_older_manifests_and_an_unknown_mode():
    from dwakd.teacher_cache.format import logit_mode

    assert logit_mode({"lossless": True}) == "full" and logit_mode({"lossless": False}) == "topk"  # before head mode
    assert logit_mode({"lossless": True, "logits": "head"}) == "head"
    with pytest.raises(TeacherCacheError, match="'sparse' is not one this dwakd reads"):
        logit_mode({"lossless": False, "logits": "sparse"})


def test_head_mode_is_refused_for_a_teacher_whose_logits_are_not_its_head_on_the_final_state(caches, tmp_path,
                                                                                              monkeypatch):
    config = _config(caches["yaml"], tmp_path / "unused")
    monkeypatch.setattr("dwakd.trainer._head_reproduces_logits", lambda *args: False)  # e.g. logit soft-capping
    with pytest.raises(TeacherCacheError, match="--k head"):
        build_teacher_cache(config, tmp_path / "capped", CacheSettings(k="head"), show_progress=False)
    with pytest.raises(ValueError, match="hidden=False"):
        CacheSettings(k="head", hidden=False)
    with pytest.raises(ValueError, match="'head'"):
        CacheSettings(k="heads")


# ---- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "named"), [
    (["teacher.seed=2"], "teacher weights"),
    (["teacher.tokenizer=builtin:gpt2"], "teacher tokenizer"),
    (["data.max_length=48"], "data.max_length: cache 64, this run 48"),
    (["data.max_prompt_length=24"], "data.max_prompt_length: cache 32, this run 24"),
    (["teacher.dtype=bfloat16"], "teacher compute setup"),
])
def test_cache_of_another_teacher_tokenizer_or_length_is_refused(caches, tmp_path, overrides, named):
    config = _config(caches["yaml"], tmp_path, "method=dskd", f"teacher.cache={caches['topk']}", *overrides)
    with pytest.raises(ConfigError, match=named):
        build_training(config, show_progress=False)


@pytest.mark.slow
def test_local_teacher_other_weights_or_tokenizer_json_is_refused(tmp_path, qwen_tokenizer):
    """A teacher saved as files: its weight files and the tokenizer's JSON are fingerprinted by content."""
    from dwakd.models import build_tiny_model

    tree = yaml.safe_load(_yaml(tmp_path).read_text())
    sizes = dict(tree["teacher"].pop("tiny"))
    arch = sizes.pop("arch")
    teacher_dir = tmp_path / "teacher"
    build_tiny_model(arch, len(qwen_tokenizer), seed=1, **sizes).save_pretrained(teacher_dir)
    tree["teacher"]["name_or_path"] = str(teacher_dir)
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(tree))
    build_teacher_cache(_config(path, tmp_path / "x", "data.max_train_examples=1"), tmp_path / "cache",
                        CacheSettings(k=8), show_progress=False)
    run = ["method=dskd", "data.max_train_examples=1", f"teacher.cache={tmp_path / 'cache'}"]
    build_training(_config(path, tmp_path / "run", *run), show_progress=False)  # the same files: accepted

    # the same vocabulary and length, another pre-tokenizer (digits in threes): only the tokenizer differs
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    source = json.loads(qwen_tokenizer.backend_tokenizer.to_str())
    split = source["pre_tokenizer"]["pretokenizers"][0]["pattern"]
    assert "\\p{N}|" in split["Regex"]
    split["Regex"] = split["Regex"].replace("\\p{N}|", "\\p{N}{1,3}|")
    other = tmp_path / "qwen-digits3"
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(source)),
                            eos_token=qwen_tokenizer.eos_token).save_pretrained(other)
    with pytest.raises(ConfigError, match="teacher tokenizer") as refused:
        build_training(_config(path, tmp_path / "run", *run, f"teacher.tokenizer={other}"), show_progress=False)
    assert "teacher weights" not in str(refused.value)

    build_tiny_model(arch, len(qwen_tokenizer), seed=2, **sizes).save_pretrained(teacher_dir)  # other weights
    with pytest.raises(ConfigError, match="teacher weights") as refused:
        build_training(_config(path, tmp_path / "run", *run), show_progress=False)
    assert "teacher tokenizer" not in str(refused.value)


def test_cache_of_other_data_is_refused_naming_the_file(tmp_path):
    data = tmp_path / "train.jsonl"
    lines = (REPO / "data" / "dolly-tiny" / "train.jsonl").read_text().splitlines()[:3]
    data.write_text("\n".join(lines) + "\n")
    path = _yaml(tmp_path, data)
    build_teacher_cache(_config(path, tmp_path / "x"), tmp_path / "cache", CacheSettings(k=8), show_progress=False)
    config = _config(path, tmp_path / "run", "method=dskd", f"teacher.cache={tmp_path / 'cache'}")
    build_training(config, show_progress=False)  # same data: accepted
    moved = tmp_path / "moved" / "train.jsonl"  # the same file elsewhere (a copied demo folder): accepted
    moved.parent.mkdir()
    moved.write_bytes(data.read_bytes())
    build_training(_config(path, tmp_path / "run", "method=dskd", f"teacher.cache={tmp_path / 'cache'}",
                           f"data.train={moved}"), show_progress=False)
    data.write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    with pytest.raises(ConfigError, match=f"data.train: content of {data} differs"):
        build_training(config, show_progress=False)
    bigger = _config(path, tmp_path / "run", "method=dskd", f"teacher.cache={tmp_path / 'cache'}",
                     f"data.train={REPO / 'data' / 'dolly-tiny' / 'train.jsonl'}")
    with pytest.raises(ConfigError, match="cache built from"):
        build_training(bigger, show_progress=False)


def test_examples_missing_from_the_cache_are_refused_before_training(caches, tmp_path):
    config = _config(caches["yaml"], tmp_path, "method=dskd", f"teacher.cache={caches['topk']}",
                     "data.max_train_examples=6")  # the cache holds the first 4
    with pytest.raises(ConfigError, match="no rows for 2 of the 6 training examples"):
        build_training(config, show_progress=False)


def _shard(cache: Path) -> Path:
    return next(cache.glob("shard-*.safetensors"))


def test_corrupt_or_truncated_shard_is_an_error_naming_it(caches, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(caches["topk"], cache)
    shard = _shard(cache)
    config = _config(caches["yaml"], tmp_path / "run", "method=dskd", f"teacher.cache={cache}")
    run = build_training(config, show_progress=False)
    # one flipped bit in the rows: the per-example checksum catches it when the rows are read
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match=f"{shard}.*checksum"):
        next(iter(run.trainer.get_train_dataloader()))
    assert any(str(shard) in problem for problem in verify_cache(cache))
    # a cut file: refused when the cache is opened
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ConfigError, match=f"{shard} is truncated"):
        build_training(config, show_progress=False)
    with pytest.raises(TeacherCacheError, match="incomplete"):
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["state"] = "building"
        (cache / "manifest.json").write_text(json.dumps(manifest))
        TeacherCache(cache)


def test_building_into_a_cache_of_other_settings_is_refused(caches, tmp_path):
    config = _config(caches["yaml"], tmp_path)
    with pytest.raises(TeacherCacheError, match="k: cache 64, now 16"):
        build_teacher_cache(config, caches["topk"], CacheSettings(k=16, layers=(1,), tail_rank=0),
                            show_progress=False)


# ---- resume ---------------------------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


def _stable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("build_seconds", "seconds_this_run", "sizes")}


@pytest.mark.parametrize("tail_rank", [0, 8])
def test_build_killed_between_shards_resumes_to_the_same_cache(caches, tmp_path, monkeypatch, tail_rank):
    config = _config(caches["yaml"], tmp_path / "x")
    settings = CacheSettings(k=16, shard_mb=1e-6, tail_rank=tail_rank)  # one example per shard
    reference = tmp_path / "reference"
    build_teacher_cache(config, reference, settings, show_progress=False)
    assert len(list(reference.glob("shard-*"))) == 4

    killed = tmp_path / "killed"
    original = CacheBuilder._compute
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            (killed / ".shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # a write cut by the kill
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CacheBuilder, "_compute", dying)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(config, killed, settings, show_progress=False)
    monkeypatch.setattr(CacheBuilder, "_compute", original)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["state"] == "building" and len(manifest["shards"]) == 2
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache(killed)

    resumed = build_teacher_cache(config, killed, settings, show_progress=False)
    assert resumed["state"] == "complete"
    assert _files(killed) == _files(reference)  # byte-identical shards and tables, no partial file left
    assert _stable(json.loads((killed / "manifest.json").read_text())) == \
        _stable(json.loads((reference / "manifest.json").read_text()))
    assert verify_cache(killed) == []


def test_a_lost_tail_basis_rebuilds_every_shard(caches, tmp_path, caplog):
    """The shards' tail coefficients are on the basis in the tables: tables cut after the shards were written are
    refitted and every shard is rebuilt, not only the tables."""
    config = _config(caches["yaml"], tmp_path / "x")
    settings = CacheSettings(k=16, shard_mb=1e-6, tail_rank=8)
    out = tmp_path / "cache"
    build_teacher_cache(config, out, settings, show_progress=False)
    reference = _files(out)
    tables = out / "tables.safetensors"
    tables.write_bytes(tables.read_bytes()[:-10])
    with caplog.at_level("WARNING"):
        rebuilt = build_teacher_cache(config, out, settings, show_progress=False)
    assert "tail basis is refitted and every shard rebuilt" in caplog.text
    assert rebuilt["state"] == "complete" and len(rebuilt["shards"]) == 4
    assert _files(out) == reference and verify_cache(out) == []


# ---- processes -------------------------------------------------------------------------------------------------------
def _env() -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "dwakd.cli", *args]


@pytest.mark.slow
def test_sigkill_during_build_then_rerun_gives_the_uninterrupted_cache(caches, tmp_path):
    import signal
    import subprocess
    import time

    common = [str(caches["yaml"]), *FAST, "data.max_train_examples=12", "--k", "16", "--shard-mb", "0.000001",
              "--no-progress"]
    reference = tmp_path / "reference"
    subprocess.run(_cli("teacher-cache", *common, "--out", str(reference)), env=_env(), check=True,
                   capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli("teacher-cache", *common, "--out", str(killed)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            manifest = killed / "manifest.json"
            if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    partial = json.loads((killed / "manifest.json").read_text())
    assert partial["state"] == "building" and 2 <= len(partial["shards"]) < len(partial["plan"])
    rerun = subprocess.run(_cli("teacher-cache", *common, "--out", str(killed)), env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _files(killed) == _files(reference)
    assert _stable(json.loads((killed / "manifest.json").read_text())) == \
        _stable(json.loads((reference / "manifest.json").read_text()))


@pytest.mark.slow
def test_two_processes_each_read_their_own_rows(caches, tmp_path):
    """DDP over 2 CPU processes (gloo), 2 per device, from the cache == 1 process from the cache with the same two
    micro-batches of 2, accumulated (not one batch of 4: DSKD normalises teacher states over the micro-batch, so that
    is another computation; tests/test_robustness.py), with a student without dropout."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # no dropout: the ranks would draw other masks than the single process
    no_dropout = ("student.tiny={arch: gpt2, hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 128, "
                  "max_positions: 256, resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}")
    common = [str(caches["yaml"]), *FAST, "method=dskd", "training.max_steps=1", "data.max_train_examples=4",
              f"teacher.cache={caches['topk']}", no_dropout, "--no-progress"]
    single = tmp_path / "single"
    subprocess.run(_cli("train", *common, f"output_dir={single}", "training.per_device_train_batch_size=2",
                        "training.gradient_accumulation_steps=2"), env=_env(), check=True, capture_output=True,
                   timeout=600)
    multi = tmp_path / "multi"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         "--master_addr=127.0.0.1", "-m", "dwakd.cli", "train", *common, f"output_dir={multi}",
         "training.per_device_train_batch_size=2", "training.ddp_backend=gloo"],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for key in ("loss", "ce", "t2s_ce", "s2t_kd"):
        a, b = _log(single), _log(multi)
        assert [e["step"] for e in a] == [e["step"] for e in b] == [1]
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-4), key
