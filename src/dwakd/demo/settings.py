"""What defines a `dwakd demo` run (`DemoSettings`, the full and `--quick` presets) and what a run records (`RunLog`).

Both the pipeline and the report read these; neither imports the other's module for them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from dwakd.demo.suite import SuiteSizes
from dwakd.demo.tokenizers import TokenizerSettings

DEFAULT_METHODS = ("sft", "dskd", "dwakd")
CACHE_LABEL = "teacher cache"  # `--teacher-cache`: the cache-building job (time table, `RunLog.cached`)
LIVE_TEACHER = -1  # `run_demo(teacher_cache_k=LIVE_TEACHER)`, `--live-teacher`: no cache, whatever the preset says
ALL_METHODS = "all"  # `--methods all`: every registered method, whatever is registered when the demo runs


# The demo's method options, chosen on the dev splits (one per test distribution, five training seeds, each method
# the variant with the best dev Avg; benchmarks/results/demo_sweep_dev4.json, benchmarks/README.md): kd_rate 0.25
# for both distilled methods (DSKD 35.19 vs 34.08 at 0.5; DWA-KD 35.79 vs 35.19), DWA-KD on the skewed reverse KL
# (its base), DSKD on the forward KL (srkl 34.34, a 300-step KD warm-up 33.95). The ablation presets share DWA-KD's,
# so Table 3 compares one component at a time.
DSKD_DEMO_OPTIONS = {"kd_rate": 0.25}
DWAKD_DEMO_OPTIONS = {"kd_objective": "srkl", "kd_rate": 0.25}
DWAKD_FAMILY = ("dwakd", "dwakd-ew", "dwakd-dtw", "dwakd-bdtw", "dwakd-nogate")


@dataclass
class DemoSettings:
    """Everything that defines a demo run; `demo_settings(quick)` gives the two presets."""

    preset: str = "full"  # "full" or "quick" (the smoke run: its numbers mean nothing)
    suite: SuiteSizes = field(default_factory=SuiteSizes)
    tokenizers: TokenizerSettings = field(default_factory=TokenizerSettings)
    teacher_model: dict[str, Any] = field(default_factory=lambda: {
        "arch": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 768,
        "max_positions": 320, "tie_word_embeddings": True})
    student_model: dict[str, Any] = field(default_factory=lambda: {
        "arch": "gpt2", "hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 512,
        "max_positions": 320})
    teacher_init_seed: int = 1
    student_init_seed: int = 0  # every student starts from this same initialisation
    teacher_training: dict[str, Any] = field(default_factory=lambda: {
        "max_steps": 500, "per_device_train_batch_size": 32, "learning_rate": 2e-3, "warmup_steps": 30})
    # batch 8 as in the papers' recipe: on the dev split it beat batch 16 (same epochs) for SFT, DSKD and DWA-KD in
    # every training seed (benchmarks/results/demo_sweep_dev.json); lr 1e-3 and kd_rate 0.9 were worse for all
    student_training: dict[str, Any] = field(default_factory=lambda: {
        "max_steps": 1200, "per_device_train_batch_size": 8, "learning_rate": 2e-3})
    max_prompt_length: int = 160
    max_length: int = 288
    methods: tuple[str, ...] = DEFAULT_METHODS
    # per method name, chosen on the dev splits: see DSKD_DEMO_OPTIONS, DWAKD_DEMO_OPTIONS
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"dskd": dict(DSKD_DEMO_OPTIONS)}
        | {name: dict(DWAKD_DEMO_OPTIONS) for name in DWAKD_FAMILY})
    projector_lr: float = 1e-3
    train_seeds: tuple[int, ...] = (0, 1, 2)  # students' training seeds (data order, projector init)
    eval_seeds: tuple[int, ...] = (10, 20, 30)  # sampling seeds
    eval_batch_size: int = 32
    max_new_tokens: int = 128
    # bf16 autocast: a gain only on CPUs with native bf16 (AVX-512 BF16 / AMX); on an AVX2-only CPU a training step
    # of the demo's student cost 5x, of its teacher 8.5x the CPU time of fp32 (benchmarks/demo_autocast.py,
    # benchmarks/results/demo_speed.json, measured at load 16), so fp32 is the default
    bf16: bool = False
    # the distilled students read the teacher from a `dwakd teacher-cache` built once after it is trained instead of
    # running it at every step, which was half of their step time: "head" (the default) stores the final hidden
    # state and recomputes the logits with the teacher's head, exactly; K: top-K logits plus a rank-32 tail (not
    # exact: top-64 is 0.0017 nats per token off on the demo's teacher, 0.047 with a flat tail); 0: lossless, every
    # logit; None (`--live-teacher`): they run the live teacher
    teacher_cache_k: int | str | None = "head"

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-friendly dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def demo_settings(quick: bool = False) -> DemoSettings:
    """The full demo (minutes on a 2-core CPU) or `--quick` (a smoke run of the same pipeline, well under 2 minutes)."""
    if not quick:
        return DemoSettings()
    return DemoSettings(
        preset="quick",
        tokenizers=TokenizerSettings(teacher_vocab=1500, student_vocab=800),
        suite=SuiteSizes(train=1000, student_train=300, dev=16, test=16),
        teacher_model={"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128,
                       "max_positions": 320},
        student_model={"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                       "max_positions": 320},
        teacher_training={"max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 3e-3},
        # every step logged: ten points per loss curve, and runs can be compared step by step (--teacher-cache test)
        student_training={"max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "logging_steps": 1},
        train_seeds=(0, 1),
        eval_seeds=(10, 20),
        eval_batch_size=16,
        max_new_tokens=16,
    )


def student_name(method: str, seed: int) -> str:
    """Folder and row name of one student: `<method>-seed<k>`."""
    return f"{method}-seed{seed}"


@dataclass
class RunLog:
    """What the pipeline records while it runs, for the report: per-stage time, threads, cache use, training info."""

    wall_seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall-clock seconds
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # stage -> CPU seconds (every thread, every worker)
    threads: dict[str, int] = field(default_factory=dict)  # stage -> torch threads per process
    workers: dict[str, int] = field(default_factory=dict)  # stage -> parallel worker processes
    cached: dict[str, bool] = field(default_factory=dict)  # stage or model -> reused from an earlier run
    train_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> seconds, steps, loss
    failed: dict[str, str] = field(default_factory=dict)  # model -> error (`--methods all` goes on past one)
    # `--teacher-cache`: k, folder, methods it serves / the live teacher runs (with why), build seconds, size
    teacher_cache: dict[str, Any] = field(default_factory=dict)
    load_at_start: float = 0.0  # 1-minute load average when the run started
    versions: dict[str, str] = field(default_factory=dict)  # torch, transformers, ...
