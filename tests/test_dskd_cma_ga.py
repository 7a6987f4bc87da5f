"""DSKD-CMA-GA: the key–query matching loss and its gradients against a naive float64 reference, the discriminator's
own optimizer group, the released-code control, exact resume after a kill (discriminator and its optimizer state)."""

from __future__ import annotations

import math
import signal
import subprocess

import pytest
import torch
from _kd_helpers import (
    context_for,
    linear,
    make_batch,
    naive_std,
    one_thread,
    run_models,
    tiny_student,
    tiny_teacher,
    trainable,
    valid_positions,
)

from dwakd.methods import build_method
from dwakd.methods.base import OptionError


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models():
    return tiny_student(), tiny_teacher()


def build(models, seed: int = 3, name: str = "dskd-cma-ga", **options):
    torch.manual_seed(seed)
    defaults = {"disc_hidden": 8} if name == "dskd-cma-ga" else {}
    return build_method(name, context_for(*models), {**defaults, **options}).double().eval()


def naive_discriminator(d, x: torch.Tensor) -> torch.Tensor:
    """D(x) for one vector: highway (gate = transform = W_h x + b_h), hidden layer, LeakyReLU(0.1), output."""
    g = linear(d.highway, x)
    s = 1 / (1 + torch.exp(-g))
    y = s * torch.clamp(g, min=0) + (1 - s) * x
    h = linear(d.hidden, y)
    h = torch.where(h > 0, h, 0.1 * h)
    return linear(d.out, h)[0]


def naive_bce(z: torch.Tensor, target: float) -> torch.Tensor:
    """−[y log σ(z) + (1 − y) log(1 − σ(z))] written with log(1 + e^{±z})."""
    return target * torch.log1p(torch.exp(-z)) + (1 - target) * torch.log1p(torch.exp(z))


def naive_kq(method, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_j BCE(D(K_j), 1), Σ_i BCE(D(Q_i), 0)) by loops; differentiable in the query projector and D."""
    s, t = inputs.student, inputs.teacher
    E_s = inputs.student_out.model.get_input_embeddings().weight.double()
    E_t = inputs.teacher_out.model.get_input_embeddings().weight.double()
    batch = s.input_ids.shape[0]
    keys = {(b, j): torch.cat([E_t[t.input_ids[b, j]], E_t[t.labels[b, j]]]).detach()
            for b in range(batch) for j in valid_positions(t, b)}
    sd = naive_std(list(keys.values()))
    real = sum(naive_bce(naive_discriminator(method.discriminator, k / sd), 1.0) for k in keys.values())
    fake = torch.zeros((), dtype=torch.float64)
    for b in range(batch):
        for i in valid_positions(s, b):
            index = torch.cat([E_s[s.input_ids[b, i]], E_s[s.labels[b, i]]]).detach()
            query = linear(method.projectors.query, index)
            fake = fake + naive_bce(naive_discriminator(method.discriminator, query), 0.0)
    return real, fake


def grads(loss: torch.Tensor, params) -> dict[str, torch.Tensor]:
    values = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True, retain_graph=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params, values)}


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_kq_loss_and_gradients_match_reference(models, scale: float) -> None:
    """L_KQ equals the loops; D gets +∇L_KQ; the query projector gets −scale·∇(fake term) (it is trained to fool D);
    nothing else — the student included — gets anything from L_KQ."""
    student, teacher = models
    method = build(models, kq_weight=0.7, reversal_scale=scale)
    batch = make_batch()
    inputs = run_models(student, teacher, batch)
    n = float(inputs.num_items)
    out = method(inputs)
    real, fake = naive_kq(method, run_models(student, teacher, batch))
    assert out.parts["kq_real"].item() == pytest.approx(real.item() / n, rel=1e-10)
    assert out.parts["kq_fake"].item() == pytest.approx(fake.item() / n, rel=1e-10)
    assert out.parts["kq"].item() == pytest.approx((real + fake).item() / n, rel=1e-10)
    method.options.kq_weight = 0.0  # the same method and weights without L_KQ: DSKD-CMA's loss
    host = method(run_models(student, teacher, batch))
    method.options.kq_weight = 0.7
    assert out.loss.item() - host.loss.item() == pytest.approx(0.7 * (real + fake).item() / n, rel=1e-9)

    params = trainable(method, student)
    got = grads(out.loss, params)
    method.options.kq_weight = 0.0
    base = grads(method(run_models(student, teacher, batch)).loss, params)
    method.options.kq_weight = 0.7
    d_params = [(k, p) for k, p in params if k.startswith("method.discriminator.")]
    q_params = [(k, p) for k, p in params if k.startswith("method.projectors.query.")]
    want_d = grads(0.7 * (real + fake) / n, d_params)
    want_q = grads(0.7 * fake / n, q_params)
    for name, _ in params:
        delta = got[name] - base[name]
        if name in want_d:
            torch.testing.assert_close(delta, want_d[name], rtol=1e-7, atol=1e-12, msg=name)
            assert want_d[name].abs().sum() > 0
        elif name in want_q:  # the fooling sign: against the discriminator's objective
            torch.testing.assert_close(delta, -scale * want_q[name], rtol=1e-7, atol=1e-12, msg=name)
            assert want_q[name].abs().sum() > 0
        else:  # the student and the t2s / s2t projectors: untouched by L_KQ
            assert delta.abs().max().item() < 1e-12, name
    assert all(p.grad is None for p in teacher.parameters())


def test_discriminator_step_separates_and_query_step_fools(models) -> None:
    """A small step along L_KQ's share of the gradient: D's loss falls; the queries' term rises (they fool D more)."""
    student, teacher = models
    method = build(models)
    batch = make_batch()
    params = trainable(method, student)
    full = grads(method(run_models(student, teacher, batch)).loss, params)
    method.options.kq_weight = 0.0
    base = grads(method(run_models(student, teacher, batch)).loss, params)
    method.options.kq_weight = 1.0
    kq_grad = {name: full[name] - base[name] for name in full}

    def parts() -> tuple[float, float]:
        with torch.no_grad():
            out = method(run_models(student, teacher, batch))
        return out.parts["kq"].item(), out.parts["kq_fake"].item()

    kq_before, fake_before = parts()
    for prefix, check in (("method.discriminator.", lambda: parts()[0] < kq_before),
                          ("method.projectors.query.", lambda: parts()[1] > fake_before)):
        saved = {name: p.detach().clone() for name, p in params if name.startswith(prefix)}
        with torch.no_grad():
            for name, p in params:
                if name in saved:
                    p -= 1e-2 * kq_grad[name]
        assert check(), prefix
        with torch.no_grad():
            for name, p in params:
                if name in saved:
                    p.copy_(saved[name])


def test_reference_code_control_adds_no_gradient(models) -> None:
    """`reference_code`: queries detached and D frozen, as released: L_KQ is logged and changes no gradient."""
    student, teacher = models
    method = build(models, reference_code=True)
    assert not any(p.requires_grad for p in method.discriminator.parameters())
    batch = make_batch()
    out = method(run_models(student, teacher, batch))
    assert math.isfinite(out.parts["kq"].item()) and out.parts["kq"].item() > 0
    params = trainable(method, student)
    got = grads(out.loss, params)
    method.options.kq_weight = 0.0
    base = grads(method(run_models(student, teacher, batch)).loss, params)
    for name, _ in params:
        assert torch.equal(got[name], base[name]), name


def test_same_projector_init_as_dskd(models) -> None:
    ga, dskd = build(models, seed=5), build(models, seed=5, name="dskd")
    for (name, a), (_, b) in zip(dskd.projectors.named_parameters(), ga.projectors.named_parameters()):
        assert torch.equal(a, b), name


def test_options_are_checked(models) -> None:
    for bad in ({"disc_hidden": 0}, {"disc_lr": 0.0}, {"disc_dropout": 1.0}, {"kq_weight": -1.0},
                {"reference_code": "yes"}):
        name = next(iter(bad))
        with pytest.raises(OptionError, match=f"method.options.{name}"):
            build_method("dskd-cma-ga", context_for(*models), bad)


def test_discriminator_has_its_own_optimizer_group(tiny_yaml, tmp_path) -> None:
    from dwakd.config import load_config
    from dwakd.run import build_training

    config = load_config(tiny_yaml, ["method=dskd-cma-ga", f"output_dir={tmp_path / 'o'}", "data.eval=null",
                                     "method.options={disc_lr: 0.0042, disc_hidden: 16}", "method.projector_lr=0.0123"])
    run = build_training(config, show_progress=False)
    optimizer = run.trainer.create_optimizer()
    disc = {id(p) for p in run.model.method.discriminator.parameters()}
    projectors = {id(p) for p in run.model.method.projectors.parameters()}
    seen = set()
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        seen |= ids
        if ids & disc:
            assert ids <= disc and group["lr"] == 0.0042
        elif ids & projectors:
            assert ids <= projectors and group["lr"] == 0.0123
        else:
            assert group["lr"] == run.trainer.args.learning_rate
    assert disc <= seen and projectors <= seen


def test_resume_after_kill_restores_discriminator_and_its_optimizer(tiny_yaml, tmp_path) -> None:
    """SIGKILL at the end of step 3 (after checkpoint-2), resume: per-step losses and parts, and the final
    discriminator weights and Adam moments, equal an uninterrupted run's (the discriminator trains with dropout, so
    RNG state matters too). The kill comes from inside the training loop at a chosen step (tests/_stop_at_step.py),
    not from a timer."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from test_robustness import SMALL, cli, env, losses

    common = [str(tiny_yaml), *SMALL, "method=dskd-cma-ga", "method.options={disc_hidden: 16, disc_lr: 0.002}",
              "training.max_steps=4", "training.save_strategy=steps", "training.save_steps=2",
              "training.per_device_train_batch_size=2", "data.max_train_examples=16"]
    ref = tmp_path / "ref"
    subprocess.run(cli(*common, f"output_dir={ref}"), env=env(), check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    stopper = Path(__file__).resolve().parent / "_stop_at_step.py"
    killed = subprocess.run([sys.executable, str(stopper), "3", "KILL", *common, f"output_dir={out}"], env=env(),
                            capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    saved = load_file(str(out / "checkpoint-2" / "distill_method.safetensors"))
    assert any(k.startswith("discriminator.") for k in saved)
    resumed = subprocess.run(cli(*common, f"output_dir={out}", "training.resume_from_checkpoint=last"),
                             env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in ("loss", "kq", "kq_fake", "ce"):
        a, b = losses(ref, key), losses(out, key)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
        for (step, x), (_, y) in zip(a, b):
            assert y == pytest.approx(x, rel=1e-5), f"{key} at step {step}"
    final_ref = load_file(str(ref / "checkpoint-4" / "distill_method.safetensors"))
    final_out = load_file(str(out / "checkpoint-4" / "distill_method.safetensors"))
    for name in final_ref:
        torch.testing.assert_close(final_out[name], final_ref[name], rtol=1e-5, atol=1e-7, msg=name)
    opt_ref = torch.load(ref / "checkpoint-4" / "optimizer.pt", weights_only=True)
    opt_out = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert len(opt_ref["param_groups"]) == len(opt_out["param_groups"]) == 6  # student, projectors, D (× decay)
    for index, state in opt_ref["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_out["state"][index][moment], state[moment], rtol=1e-5, atol=1e-9)


def test_bf16_autocast_and_lora_student() -> None:
    from dwakd.models import LoraSpec, apply_lora

    teacher = tiny_teacher(dtype=torch.float32)
    student = apply_lora(tiny_student(dtype=torch.float32), LoraSpec(r=4, alpha=8, target_modules=["c_attn"]))
    torch.manual_seed(0)
    method = build_method("dskd-cma-ga", context_for(student, teacher), {"disc_hidden": 8})
    batch = make_batch()
    fp32 = method(run_models(student, teacher, batch))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(run_models(student, teacher, batch))
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(fp32.loss.item(), rel=5e-2)
    assert out.parts["kq"].item() == pytest.approx(fp32.parts["kq"].item(), rel=5e-2)
    out.loss.backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.discriminator.parameters())


def _logged(run, key: str) -> list[float]:
    return [e[key] for e in run.trainer.state.log_history if key in e and "loss" in e]


def test_gradient_accumulation_matches_one_big_batch(tiny_yaml, tmp_path) -> None:
    """2 micro-batches of 2 == 1 batch of 4 for the loss, L_KQ and the discriminator (token-normalised sums: a
    per-micro-batch mean would double L_KQ's gradient here). Plain SGD and no dropout, so the second step compares
    gradients without Adam's amplification of rounding; DSKD-CMA's keys are scaled by a per-micro-batch standard
    deviation, so the two runs agree to 1e-3, not to rounding."""
    from test_robustness import SMALL

    from dwakd.config import load_config
    from dwakd.run import build_training

    common = [SMALL[0], "method=dskd-cma-ga", "method.options={disc_hidden: 16, disc_dropout: 0.0}", "data.eval=null",
              "training.max_steps=2", "training.logging_steps=1", "data.max_length=64", "data.max_prompt_length=32",
              "training.optim=sgd", "training.learning_rate=0.05", "method.projector_lr=0.05"]
    runs = []
    for name, extra in (("big", ["training.per_device_train_batch_size=4"]),
                        ("small", ["training.per_device_train_batch_size=2",
                                   "training.gradient_accumulation_steps=2"])):
        run = build_training(load_config(tiny_yaml, [*common, *extra, f"output_dir={tmp_path / name}"]),
                             show_progress=False)
        run.trainer.train()
        runs.append(run)
    for key in ("loss", "kq", "kq_real", "kq_fake", "ce"):
        assert _logged(runs[1], key) == pytest.approx(_logged(runs[0], key), rel=1e-3), key
    for (name, a), (_, b) in zip(runs[0].model.method.named_parameters(), runs[1].model.method.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_two_processes_equal_one(tiny_yaml, tmp_path) -> None:
    """DDP over 2 CPU processes (gloo), 2 sequences each == 1 process accumulating two micro-batches of 2: loss and
    L_KQ parts (dropout off).

    The reference accumulates rather than taking one batch of 4 because the keys are divided by the std of their
    own micro-batch (`masked_global_std`, as DSKD's code), so a batch of 4 gives other keys than two ranks of 2:
    kq_real was 1.8e-4 (relative) off at step 1, before any update.
    """
    import sys

    from test_robustness import LOGGED_UNIT, SMALL, cli, env, free_port, losses

    common = [str(tiny_yaml), *SMALL, "training.max_steps=3", "data.max_train_examples=24", "method=dskd-cma-ga",
              "method.options={disc_hidden: 16, disc_dropout: 0.0}"]
    single = tmp_path / "single"
    subprocess.run(cli(*common, f"output_dir={single}", "training.per_device_train_batch_size=2",
                       "training.gradient_accumulation_steps=2"),
                   env=env(), check=True, capture_output=True, timeout=600)
    multi = tmp_path / "ddp"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "--master_addr=127.0.0.1", "-m", "dwakd.cli", "train", *common, f"output_dir={multi}",
         "training.per_device_train_batch_size=2", "training.ddp_backend=gloo"],
        env=env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for key in ("loss", "kq", "kq_fake", "kq_real"):
        a, b = losses(single, key), losses(multi, key)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
        for (_, x), (_, y) in zip(a, b):
            assert y == pytest.approx(x, rel=1e-4, abs=LOGGED_UNIT), key
