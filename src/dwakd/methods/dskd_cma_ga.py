"""DSKD-CMA-GA (Tsiapali, Do, Knill, ICASSP 2026): DSKD-CMA plus adversarial key–query matching.

The cross-model attention of DSKD-CMA compares student queries Q = query([E_s(x); E_s(y)]) with teacher keys
K = [E_t(x); E_t(y)] / std. A discriminator D learns to tell K (real) from Q (fake); the query projector learns to
fool it, so the distribution of the queries moves towards that of the keys. With every sum over valid positions
and divided by N (docs/methods.md#21-global-token-normalisation):

    L_KQ = [Σ_j BCE(D(K_j), 1) + Σ_i BCE(D(R(Q_i)), 0)] / N
    loss = L_DSKD-CMA + kq_weight·L_KQ

R is a gradient-reversal layer (identity forward, −reversal_scale × gradient backward): one backward pass gives D
the gradient of L_KQ (it minimises the discrimination loss) and the query projector the negated gradient (it
maximises it). D's parameters form their own optimizer group with learning rate `disc_lr`
(`DistillationMethod.param_groups`), so D is updated by the same optimizer step as everything else, and its weights
(in `distill_method.safetensors`) and optimizer state (in the Trainer's `optimizer.pt`) are saved, restored on
resume, accumulated over micro-batches and all-reduced under DDP like every other parameter.

Why gradient reversal and not alternating steps: the code the paper cites builds exactly this (a GradReverse
layer before D, one loss), the paper gives a single training objective L = L_DSKD-CMA + L_KQ, and one backward
keeps D inside the Trainer's step, clipping, schedule, checkpoints and DDP with no second optimizer to wire in.

Choices where the paper is silent, and departures from the cited code (docs/methods.md#67-dskd-cma-ga):
- the cited code detaches Q before D and never puts D in the optimizer, so its adversarial part trains nothing;
  here Q is not detached and D is trained. `reference_code: true` reproduces the released behaviour (Q detached,
  D frozen at its initialisation: L_KQ is logged and adds no gradient) as a control;
- only valid response positions enter L_KQ (the cited code feeds every padded position, prompt and padding too);
- L_KQ is a per-token sum divided by N, like every other term; the cited code adds batch means and then divides the
  whole loss by the token count, so its `kq_rate` acts as kq_weight ≈ kq_rate / (tokens per micro-batch);
- kq_weight = 1 (the paper's L_DSKD-CMA + L_KQ); D's size (hidden 768, dropout 0.1) is the cited code's; D's learning
  rate is not given anywhere: 1e-3, the projectors' default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dwakd.methods.base import DistillationInputs, MethodContext, OptionError, check_positive
from dwakd.methods.dskd import DSKD, CMATerms, DSKDOptions
from dwakd.methods.registry import register_method
from dwakd.modules.adversarial import KeyQueryDiscriminator, reverse_gradient
from dwakd.modules.divergences import compute_dtype
from dwakd.modules.projectors import model_dims


@dataclass
class DSKDCMAGAOptions(DSKDOptions):
    """DSKD-CMA's options plus the key–query matching loss and its discriminator."""

    kq_weight: float = 1.0  # weight of L_KQ in the loss
    disc_hidden: int = 768  # hidden width of the discriminator
    disc_dropout: float = 0.1  # dropout inside the discriminator
    disc_lr: float = 1e-3  # learning rate of the discriminator's optimizer group
    reversal_scale: float = 1.0  # gradient-reversal factor on the queries (the fooling strength)
    reference_code: bool = False  # true: the released code (queries detached, discriminator never trained)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("kq_weight", self.kq_weight, allow_zero=True)
        if not isinstance(self.disc_hidden, int) or isinstance(self.disc_hidden, bool) or self.disc_hidden < 1:
            raise OptionError("disc_hidden", f"must be a positive integer; got {self.disc_hidden!r}")
        if not isinstance(self.disc_dropout, (int, float)) or not 0.0 <= self.disc_dropout < 1.0:
            raise OptionError("disc_dropout", f"must be a number in [0, 1); got {self.disc_dropout!r}")
        check_positive("disc_lr", self.disc_lr)
        check_positive("reversal_scale", self.reversal_scale, allow_zero=True)
        if not isinstance(self.reference_code, bool):
            raise OptionError("reference_code", f"must be true or false; got {self.reference_code!r}")


@register_method
class DSKDCMAGA(DSKD):
    """DSKD-CMA + a discriminator between teacher keys and student queries, trained through gradient reversal."""

    name = "dskd-cma-ga"
    title = "DSKD-CMA-GA"
    Options = DSKDCMAGAOptions

    def __init__(self, options: DSKDCMAGAOptions, context: MethodContext):
        super().__init__(options, context)  # DSKD's projectors first: same initial weights as `dskd` after one seed
        width = 2 * model_dims(context.teacher_config).embedding  # the key/query width
        self.discriminator = KeyQueryDiscriminator(width, options.disc_hidden, options.disc_dropout)
        if options.reference_code:
            self.discriminator.requires_grad_(False)

    def param_groups(self) -> dict[str, dict[str, float]]:
        return {"discriminator.": {"lr": self.options.disc_lr}}

    def extra_losses(self, inputs: DistillationInputs, terms: CMATerms) -> dict[str, tuple[torch.Tensor, float]]:
        opts: DSKDCMAGAOptions = self.options
        cma = terms.cma
        keys = cma.keys[cma.teacher_mask]  # (Q, 2e_t) real: teacher keys at valid teacher positions, no grad
        queries = cma.queries[cma.student_mask]  # (P, 2e_t) fake: student queries at valid student positions
        queries = queries.detach() if opts.reference_code else reverse_gradient(queries, opts.reversal_scale)
        real_logits = self.discriminator(keys)  # (Q,)
        real_logits = real_logits.to(compute_dtype(real_logits))  # BCE in at least fp32
        fake_logits = self.discriminator(queries)  # (P,)
        fake_logits = fake_logits.to(compute_dtype(fake_logits))
        real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits), reduction="sum")
        fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits), reduction="sum")
        n = inputs.num_items
        with torch.no_grad():
            correct = real_logits.gt(0).sum() + fake_logits.lt(0).sum()
            terms.stats["kq_disc_acc"] = correct.float() / max(1, real_logits.numel() + fake_logits.numel())
        # kq_real and kq_fake are logged only (weight 0); kq = their sum is the loss term
        return {"kq": ((real + fake) / n, opts.kq_weight), "kq_real": (real / n, 0.0), "kq_fake": (fake / n, 0.0)}
