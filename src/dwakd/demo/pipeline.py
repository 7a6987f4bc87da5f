"""`dwakd demo` end to end: suite -> two tokenizers -> teacher (sft) -> students (each method) -> evaluation -> report.

Every model is trained by `dwakd.run.train` (the `dwakd train` code path) and evaluated by
`dwakd.evaluation.runner.run_evaluation` (the `dwakd eval` code path: per-item seeded sampling, ROUGE-L).
Each stage is cached in the output folder under a fingerprint of everything that defines it (suite version
and sizes, tokenizer settings, model and training settings, method and options, seeds), so a rerun reuses
the data, the tokenizers, the teacher and every finished student; `force=True` rebuilds everything.

Output folder:
    demo_config.yaml            the DemoSettings of the run
    data/                       the suite's splits as JSONL, suite.json (sizes, families, lengths, overlap)
    tokenizers/{teacher,student}  the two trained tokenizers, tokenizers.json (sizes, boundary agreement)
    teacher/                    the teacher checkpoint, its dwakd_config.yaml, trainer_state.json (logs)
    students/<method>-seed<k>/  one student per method and training seed, same layout
    eval/generations/...        every sampled response (resumable), per model / test set / seed
    report.md, results.md/.csv/.json, results.png, loss_curves.png, timings.json, demo.log
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dwakd.demo.suite import SUITE_VERSION, TEST_SPLITS, SuiteSizes, build_suite, corpus_text, suite_fingerprint, suite_stats
from dwakd.demo.tokenizers import TokenizerSettings, boundary_agreement, train_tokenizers

logger = logging.getLogger(__name__)

STAGE_FILE = "demo_stage.json"
DEFAULT_METHODS = ("sft", "dskd", "dwakd")


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
    student_training: dict[str, Any] = field(default_factory=lambda: {
        "max_steps": 600, "per_device_train_batch_size": 16, "learning_rate": 2e-3})
    max_prompt_length: int = 160
    max_length: int = 288
    methods: tuple[str, ...] = DEFAULT_METHODS
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method name
    projector_lr: float = 1e-3
    train_seeds: tuple[int, ...] = (0,)  # students' training seeds (data order, projector init)
    eval_seeds: tuple[int, ...] = (10, 20, 30)  # sampling seeds
    eval_batch_size: int = 32
    max_new_tokens: int = 128
    bf16: bool = True  # bf16 autocast on CPU: about 2x faster training steps on AVX-512 BF16 machines
    teacher_cache_k: int | None = None  # students read the teacher from a `dwakd teacher-cache` (top-k; 0: lossless)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-friendly dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def demo_settings(quick: bool = False) -> DemoSettings:
    """The full demo (minutes on a 2-core CPU) or `--quick` (a smoke run of the same pipeline, well under 2 minutes)."""
    if not quick:
        return DemoSettings()
    return DemoSettings(
        tokenizers=TokenizerSettings(teacher_vocab=1500, student_vocab=800),
        suite=SuiteSizes(train=1000, student_train=300, dev=16, test=16),
        teacher_model={"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128,
                       "max_positions": 320},
        student_model={"arch": "gpt2", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                       "max_positions": 320},
        teacher_training={"max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 3e-3},
        student_training={"max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 3e-3},
        eval_seeds=(10, 20),
        eval_batch_size=16,
        max_new_tokens=16,
    )


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cached(folder: Path, key: str, force: bool) -> bool:
    """True when `folder` holds a finished stage with this fingerprint; otherwise clears the folder."""
    marker = folder / STAGE_FILE
    if not force and marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") == key:
                return True
        except json.JSONDecodeError:
            pass
    if folder.exists():
        shutil.rmtree(folder)
    return False


def _mark(folder: Path, key: str, info: dict[str, Any]) -> None:
    (folder / STAGE_FILE).write_text(json.dumps({"fingerprint": key, **info}, indent=2), encoding="utf-8")


def _stage_info(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STAGE_FILE).read_text(encoding="utf-8"))


def _cpu_busy_fraction(interval: float = 0.3) -> float | None:
    """Share of all CPU time spent busy during `interval` seconds (Linux /proc/stat), or None where unavailable."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)  # (idle + iowait, total)

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def choose_threads() -> int:
    """Torch threads for the next stage: $OMP_NUM_THREADS if set, else the cores other processes leave free.

    The demo's models are tiny, so each step is thousands of small parallel kernels; a thread that has to
    share its core with another process stalls every one of them (measured on a loaded 2-core machine: 2
    threads 5-50x slower than 1). So a core only counts when other processes use at most 40% of it, measured
    just before each stage (falling back to the 1-minute load average).
    """
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit():
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = _cpu_busy_fraction()
    used = busy * cores if busy is not None else (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    return max(1, min(cores, int(cores - used + 0.4)))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (`choose_threads()` when not given); returns the number in use."""
    import torch

    torch.set_num_threads(max(1, threads if threads is not None else choose_threads()))
    return torch.get_num_threads()


@dataclass
class DemoResult:
    """What a demo run produced: paths, the score tables and timings."""

    output_dir: Path
    report: Path
    table: Any  # ScoreTable (first training seed; spread over sampling seeds)
    train_seed_table: Any | None  # ScoreTable over training seeds (None with one training seed)
    timings: dict[str, float]
    checks: list[dict[str, Any]]
    cached: dict[str, bool]  # stage -> reused from an earlier run


class DemoPipeline:
    """Runs the demo stage by stage; each stage is cached under a fingerprint in `output_dir`."""

    def __init__(self, settings: DemoSettings, output_dir: str | Path, *, force: bool = False,
                 show_progress: bool = True, echo: Callable[[str], None] = print):
        self.settings = settings
        self.out = Path(output_dir)
        self.force = force
        self.show_progress = show_progress
        self.echo = echo
        self.timings: dict[str, float] = {}  # wall-clock seconds per stage
        self.cpu_timings: dict[str, float] = {}  # CPU seconds of this process per stage (all threads)
        self.cached: dict[str, bool] = {}
        self._eval_cleared = False
        self.threads = 1
        self.stage_threads: dict[str, int] = {}  # torch threads chosen for each stage
        self.load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0

    # ---- stages ---------------------------------------------------------------------------------------------------
    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        self.stage_threads[name] = self.threads = set_threads()
        started, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.timings[name] = round(time.perf_counter() - started, 2)
        self.cpu_timings[name] = round(time.process_time() - cpu, 2)
        return result

    def build_data(self) -> dict[str, Path]:
        """Write the suite's splits (cached by suite version and sizes)."""
        folder = self.out / "data"
        key = suite_fingerprint(self.settings.suite)
        names = ["train", "student_train", "dev", *TEST_SPLITS]
        paths = {name: folder / f"{name}.jsonl" for name in names}
        self.cached["suite"] = _cached(folder, key, self.force)
        if not self.cached["suite"]:
            folder.mkdir(parents=True, exist_ok=True)
            build_suite(folder, self.settings.suite)
            stats = suite_stats(paths)
            (folder / "suite.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
            _mark(folder, key, {"suite_version": SUITE_VERSION})
        self.data_key = key
        return paths

    def build_tokenizers(self, data: dict[str, Path]) -> dict[str, Path]:
        """Train the teacher's byte-level BPE and the student's WordPiece on the training split (cached)."""
        folder = self.out / "tokenizers"
        key = fingerprint(self.data_key, self.settings.tokenizers.fingerprint())
        self.cached["tokenizers"] = _cached(folder, key, self.force)
        paths = {"teacher": folder / "teacher", "student": folder / "student"}
        if not self.cached["tokenizers"]:
            folder.mkdir(parents=True, exist_ok=True)
            train_tokenizers(corpus_text(data, limit=8000), self.settings.tokenizers, folder)
            from dwakd.demo.suite import read_jsonl
            from dwakd.tokenizers import load_tokenizer

            teacher, student = (load_tokenizer(str(paths[r])) for r in ("teacher", "student"))
            texts = []
            for row in read_jsonl(data["test"]):
                refs = [row["output"]] if isinstance(row["output"], str) else row["output"]
                texts.append(f"{row['instruction']} {row['input']} {refs[0]}")
            info = {"teacher": {"type": "byte-level BPE", "vocab_size": len(teacher)},
                    "student": {"type": "WordPiece", "vocab_size": len(student)},
                    "test_split_agreement": boundary_agreement(teacher, student, texts)}
            (folder / "tokenizers.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
            _mark(folder, key, {})
        self.tokenizer_key = key
        return paths

    def _training_block(self, training: dict[str, Any], output_dir: Path) -> dict[str, Any]:
        return {"output_dir": str(output_dir), "logging_steps": 20, "save_strategy": "no", "eval_strategy": "no",
                "use_cpu": True, "bf16": self.settings.bf16, "disable_tqdm": not self.show_progress,
                "report_to": "none", **training}

    @staticmethod
    def _special_ids(tokenizer_dir: Path) -> dict[str, int]:
        """The tokenizer's EOS/pad ids for the tiny model's config (its defaults would point outside the vocabulary)."""
        from dwakd.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer_dir))
        return {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}

    def teacher_config(self, data: dict[str, Path], tokenizers: dict[str, Path]) -> dict[str, Any]:
        """The `dwakd train` config tree of the teacher: SFT of a Llama-architecture model on the whole train split."""
        s = self.settings
        return {
            "student": {"tokenizer": str(tokenizers["teacher"]),
                        "tiny": {**s.teacher_model, **self._special_ids(tokenizers["teacher"])}, "seed": s.teacher_init_seed},
            "data": {"train": str(data["train"]), "max_prompt_length": s.max_prompt_length, "max_length": s.max_length},
            "method": {"name": "sft"},
            "training": self._training_block(s.teacher_training, self.out / "teacher"),
            "seed": 0,
        }

    def student_config(self, data: dict[str, Path], tokenizers: dict[str, Path], method: str, seed: int,
                       teacher_dir: Path, output_dir: Path) -> dict[str, Any]:
        """The `dwakd train` config tree of one student: GPT-2 architecture, same initialisation for every method."""
        s = self.settings
        return {
            "student": {"tokenizer": str(tokenizers["student"]),
                        "tiny": {**s.student_model, **self._special_ids(tokenizers["student"])}, "seed": s.student_init_seed},
            "teacher": {"name_or_path": str(teacher_dir)},
            "data": {"train": str(data["student_train"]), "max_prompt_length": s.max_prompt_length,
                     "max_length": s.max_length},
            "method": {"name": method, "options": dict(s.method_options.get(method, {})), "projector_lr": s.projector_lr},
            "training": self._training_block(s.student_training, output_dir),
            "seed": seed,
        }

    def _train(self, tree: dict[str, Any], folder: Path, key: str, label: str) -> dict[str, Any]:
        """Train one model through `dwakd.run.train` unless a finished run with this fingerprint is there."""
        from dwakd.config import config_from_dict
        from dwakd.run import train

        self.cached[label] = _cached(folder, key, self.force)
        if self.cached[label]:
            self.echo(f"  {label}: reusing {folder} (same settings)")
            return _stage_info(folder)
        self._forget_generations(label)
        started = time.perf_counter()
        result = train(config_from_dict(tree, f"demo {label}"), show_progress=self.show_progress)
        info = {"seconds": round(time.perf_counter() - started, 2), "global_step": result["global_step"],
                "train_loss": result["train_loss"]}
        _mark(folder, key, info)
        self.echo(f"  {label}: {result['global_step']} steps in {info['seconds']:.0f} s, "
                  f"mean loss {result['train_loss']:.3f}")
        return info

    def _forget_generations(self, model_name: str) -> None:
        """A retrained model's old generations must not be reused by the resumable evaluation."""
        folder = self.out / "eval" / "generations" / model_name
        if folder.exists():
            shutil.rmtree(folder)

    def train_teacher(self, data: dict[str, Path], tokenizers: dict[str, Path]) -> Path:
        """SFT the teacher (cached by suite, tokenizer, model and training settings)."""
        tree = self.teacher_config(data, tokenizers)
        self.teacher_key = fingerprint(self.tokenizer_key, tree["student"]["tiny"], tree["student"]["seed"],
                                       self.settings.teacher_training, self.settings.max_prompt_length,
                                       self.settings.max_length)
        self.train_info = {"teacher": self._train(tree, self.out / "teacher", self.teacher_key, "teacher")}
        return self.out / "teacher"

    def teacher_cache(self, student_tree: dict[str, Any]) -> Path:
        """Run the teacher once over the students' data (`dwakd teacher-cache`; cached like a stage)."""
        from dwakd.config import config_from_dict
        from dwakd.teacher_cache import CacheSettings, build_teacher_cache

        folder = self.out / "teacher_cache"
        k = self.settings.teacher_cache_k or None  # 0: lossless
        key = fingerprint(self.teacher_key, student_tree["data"], k, self.settings.bf16)
        if getattr(self, "_teacher_cache_key", None) == key:  # built or checked earlier in this run
            return folder
        if not _cached(folder, key, self.force):
            tree = {**student_tree, "method": {"name": "dskd"}}  # the method only picks default tail temperatures
            started = time.perf_counter()
            manifest = build_teacher_cache(config_from_dict(tree, "demo teacher cache"), folder, CacheSettings(k=k),
                                           show_progress=self.show_progress)
            self.timings["teacher cache"] = round(time.perf_counter() - started, 2)
            _mark(folder, key, {"sizes": manifest["sizes"]})
            self.echo(f"  teacher cache: {manifest['examples']['unique']} examples in "
                      f"{self.timings['teacher cache']:.0f} s ({'lossless' if k is None else f'top-{k}'}); "
                      "students read it instead of running the teacher")
        self._teacher_cache_key = key
        return folder

    def student_name(self, method: str, seed: int) -> str:
        """Folder / row name of a student: the method, plus `-seed<k>` beyond the first training seed."""
        return method if seed == self.settings.train_seeds[0] else f"{method}-seed{seed}"

    def train_students(self, data: dict[str, Path], tokenizers: dict[str, Path], teacher_dir: Path) -> dict[str, Path]:
        """Train one student per (method, training seed), all from the same initialisation."""
        from dwakd.methods import get_method

        paths = {}
        for seed in self.settings.train_seeds:
            for method in self.settings.methods:
                name = self.student_name(method, seed)
                folder = self.out / "students" / name
                tree = self.student_config(data, tokenizers, method, seed, teacher_dir, folder)
                uses_teacher = get_method(method)[0].needs_teacher
                key = fingerprint(self.tokenizer_key, self.teacher_key if uses_teacher else None,
                                  {k: v for k, v in tree.items() if k != "teacher"})
                if uses_teacher and self.settings.teacher_cache_k is not None:
                    tree["teacher"]["cache"] = str(self.teacher_cache(tree))
                    key = fingerprint(key, "teacher cache", self.settings.teacher_cache_k)
                self.train_info[name] = self._timed(f"train {name}", lambda: self._train(tree, folder, key, name))
                paths[name] = folder
        return paths

    def evaluate(self, models: dict[str, Path], data: dict[str, Path], splits: Sequence[str] = tuple(TEST_SPLITS),
                 out_dir: Path | None = None):
        """Sample every model on every test split for every seed and score ROUGE-L (the `dwakd eval` code path)."""
        from dwakd.evaluation.datasets import DatasetSpec, load_eval_dataset
        from dwakd.evaluation.generation import GenerationSettings
        from dwakd.evaluation.runner import run_evaluation

        s = self.settings
        titles = {name: title for name, (title, _) in TEST_SPLITS.items()} | {"dev": "Dev"}
        datasets = [load_eval_dataset(DatasetSpec(name, str(data[name]), title=titles[name])) for name in splits]
        settings = GenerationSettings(max_prompt_length=s.max_prompt_length, max_length=s.max_length,
                                      max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch_size)
        out_dir = out_dir or self.out / "eval"
        # Generations are resumable per model; they stay valid while the test sets and decoding settings do
        # (a retrained model's folder is removed in `_train`).
        key = fingerprint(self.data_key, settings.fingerprint())
        if not _cached(out_dir, key, self.force and not self._eval_cleared):
            out_dir.mkdir(parents=True, exist_ok=True)
            _mark(out_dir, key, {})
        self._eval_cleared = True
        return run_evaluation({k: str(v) for k, v in models.items()}, datasets, out_dir,
                              seeds=s.eval_seeds, settings=settings, device="cpu", progress=self.show_progress,
                              write_files=False)

    # ---- the whole run ------------------------------------------------------------------------------------------
    def run(self) -> DemoResult:
        """All stages, then the report; returns paths, tables, timings and the ranking checks."""
        from dwakd.demo.report import split_tables, write_demo_report
        from dwakd.methods import get_method

        for method in self.settings.methods:
            get_method(method)  # fail before any work on an unknown method name
        self.out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.out / "demo.log", mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            started, cpu = time.perf_counter(), time.process_time()
            self.load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            threads = self.threads = set_threads()
            (self.out / "demo_config.yaml").write_text(yaml.safe_dump(self.settings.to_dict(), sort_keys=False),
                                                       encoding="utf-8")
            self.echo(f"[1/6] instruction suite (version {SUITE_VERSION})  [torch threads: {threads}]")
            data = self._timed("suite", self.build_data)
            self.echo("[2/6] tokenizers: byte-level BPE (teacher), WordPiece (student)")
            tokenizers = self._timed("tokenizers", lambda: self.build_tokenizers(data))
            self.echo("[3/6] teacher: Llama architecture, sft on the whole train split")
            teacher_dir = self._timed("train teacher", lambda: self.train_teacher(data, tokenizers))
            self.echo(f"[4/6] students: GPT-2 architecture, methods {', '.join(self.settings.methods)}, "
                      f"training seeds {', '.join(map(str, self.settings.train_seeds))}")
            students = self.train_students(data, tokenizers, teacher_dir)
            self.echo(f"[5/6] evaluation: sampling, ROUGE-L, seeds {', '.join(map(str, self.settings.eval_seeds))}")
            full = self._timed("evaluate", lambda: self.evaluate({"teacher": teacher_dir, **students}, data))
            self.timings["total"] = round(time.perf_counter() - started, 2)
            self.cpu_timings["total"] = round(time.process_time() - cpu, 2)
            self.echo("[6/6] report")
            table, seed_table = split_tables(full, self.settings, self.student_name)
            report, checks = write_demo_report(self, table, seed_table, data, tokenizers)
            return DemoResult(self.out, report, table, seed_table, dict(self.timings), checks, dict(self.cached))
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()


def run_demo(output_dir: str | Path, *, quick: bool = False, methods: Sequence[str] | None = None,
             eval_seeds: Sequence[int] | None = None, train_seeds: Sequence[int] | None = None, force: bool = False,
             show_progress: bool = True, echo: Callable[[str], None] = print,
             teacher_cache_k: int | None = None) -> DemoResult:
    """Run the demo with the preset for `quick`, optionally other methods / seeds; returns its result."""
    settings = demo_settings(quick)
    if methods:
        settings.methods = tuple(methods)
    if eval_seeds:
        settings.eval_seeds = tuple(eval_seeds)
    if train_seeds:
        settings.train_seeds = tuple(train_seeds)
    settings.teacher_cache_k = teacher_cache_k
    return DemoPipeline(settings, output_dir, force=force, show_progress=show_progress, echo=echo).run()
