"""`dwakd demo` end to end: suite -> two tokenizers -> teacher (sft) -> students (each method × training seed)
-> evaluation -> report.

Every model is trained by `dwakd.run.train` (the `dwakd train` code path) and evaluated by
`dwakd.evaluation.runner.run_evaluation` (the `dwakd eval` code path: per-item seeded sampling, ROUGE-L).

Caching: each stage is cached in the output folder under a fingerprint of everything that can change its
output: its settings, the fingerprints of the stages it reads, the dwakd sources that compute it (every module
of the package but the ones that only present results) and the versions of the libraries that compute it
(torch, transformers, tokenizers, numba, numpy). So a rerun of the same code reuses the data, the tokenizers,
the teacher and every finished student, and any change of code or library retrains what it touches;
`force=True` rebuilds everything.

Parallelism: the models are tiny, so one training step is thousands of small kernels that a second torch
thread speeds up little, while independent trainings (three training seeds per method) parallelise without any
synchronisation. Trainings and evaluations are therefore jobs on a pool of worker processes (one per free
core, one torch thread each): the teacher and the SFT students first (SFT needs no teacher), each model's
evaluation as soon as it is trained, the distilled students as soon as the teacher is saved. Results do not
depend on the number of workers: every job seeds itself and sampling is seeded per item (the `--quick` demo
gives identical tables with one worker and with two).

Teacher cache (`DemoSettings.teacher_cache_k`, head mode by default; `--teacher-cache K` sets top-K or lossless,
`--live-teacher` turns it off): one more job after the teacher's runs `dwakd teacher-cache` over the students'
training data (head mode: the final hidden states, from which the teacher's head recomputes the exact logits;
top-K logits; or every logit), and the distilled students
wait for it and train with `teacher.cache` set, so none of them runs the teacher. A method the cache cannot serve
(`dwakd.teacher_cache.cache_refusal`: mta and sra read teacher hidden states or attentions at every position;
alm and multilevel_ot need a lossless cache) trains with the live teacher, which the log and the report say. The
cache's fingerprint (teacher, data, K, stored temperatures) is part of its students' fingerprints, so runs with
and without the cache, or with another K, never reuse each other's students; live-teacher students are shared.

Output folder:
    demo_config.yaml            the DemoSettings of the run
    data/                       the suite's splits as JSONL, suite.json (sizes, families, lengths, overlap)
    tokenizers/{teacher,student}  the two trained tokenizers, tokenizers.json (sizes, boundary agreement)
    teacher/                    the teacher checkpoint, its dwakd_config.yaml, trainer_state.json (logs)
    teacher_cache/              unless --live-teacher: the teacher's outputs on the students' data (manifest.json)
    students/<method>-seed<k>/  one student per method and training seed, same layout
    eval/generations/...        every sampled response (resumable), per model / test set / seed
    report.md, results*.md/.csv/.png, results.json, loss_curves.png, timings.json, demo.log
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import resource
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dwakd.demo.report import write_demo_report
from dwakd.demo.settings import (
    ALL_METHODS,
    CACHE_LABEL,
    DEFAULT_METHODS,
    LIVE_TEACHER,
    DemoSettings,
    RunLog,
    demo_settings,
    student_name,
)
from dwakd.demo.suite import (
    DEV_SPLITS,
    SPLIT_TITLES,
    SUITE_VERSION,
    TEST_SPLITS,
    build_suite,
    corpus_text,
    suite_fingerprint,
    suite_stats,
)
from dwakd.demo.tokenizers import boundary_agreement, train_tokenizers

STAGE_FILE = "demo_stage.json"
# Modules that only present results or serve other commands: editing them changes no model and no generation.
_PRESENTATION_MODULES = frozenset({
    "cli.py", "demo/cli.py", "demo/report.py", "evaluation/cli.py", "evaluation/report.py", "evaluation/stats.py",
    "evaluation/judge.py", "evaluation/similarity.py", "evaluation/efficiency.py"})
_LIBRARIES = ("torch", "transformers", "tokenizers", "numba", "numpy")


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose numerics the stages depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def code_fingerprint() -> str:
    """Hash of the dwakd package's sources that compute data, tokenizers, models and generations, and the library
    versions: a cached stage made by other code is never reused."""
    import dwakd

    root = Path(dwakd.__file__).parent
    digest = hashlib.sha256(json.dumps(library_versions(), sort_keys=True).encode())
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative not in _PRESENTATION_MODULES:
            digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


class DemoInterrupted(KeyboardInterrupt):
    """A training job stopped on Ctrl-C or SIGTERM after saving a checkpoint: the demo stops, and the same command
    run again continues that job from its checkpoint."""


def _cached(folder: Path, key: str, force: bool) -> bool:
    """True when `folder` holds a finished stage with this fingerprint.

    A training stage of this fingerprint that was started but not finished (killed or interrupted: its marker says
    `in_progress`) keeps its folder, so its job continues from the checkpoint in it; any other folder is cleared.
    """
    marker = folder / STAGE_FILE
    if not force and marker.is_file():
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            info = {}
        if info.get("fingerprint") == key:
            return not info.get("in_progress", False)
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
    """Cores for the next stage: $OMP_NUM_THREADS if set, else the cores other processes leave free.

    A thread (or worker process) that has to share its core with another process stalls every one of the tiny
    models' small kernels (measured on a loaded 2-core machine: 2 threads 5-50x slower than 1). So a core only
    counts when other processes use at most 40% of it, measured just before each stage (falling back to the
    1-minute load average).
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


def plan_workers(jobs: int, cores: int, workers: int | None) -> tuple[int, int]:
    """(worker processes, torch threads each) for `jobs` independent jobs on `cores` free cores.

    Default: one process per core (at most one per job), each with the cores left to it; `workers` fixes the
    number of processes (1: run in this process).
    """
    if jobs < 1:
        return 1, max(1, cores)
    count = min(jobs, max(1, cores)) if workers is None else max(1, min(workers, jobs))
    return count, max(1, cores // count)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---- jobs (run in this process or in a worker process) --------------------------------------------------------
def exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """End this process once `parent` is no longer its parent (the demo was killed): no orphan keeps training."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="dwakd-parent-watch").start()


def _worker_init(threads: int, log_file: str | None, parent: int | None = None) -> None:
    """Worker process: its torch threads, its log lines appended to the demo's log file, and an end with the demo."""
    import sys
    import warnings

    if parent is not None:
        exit_with_parent(parent)
    set_threads(threads)
    warnings.filterwarnings("ignore")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if log_file:  # the main process reports each finished job; a worker's own prints go to the log
        sys.stdout = sys.stderr = open(log_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [worker] %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)


def train_job(tree: dict[str, Any], label: str, show_progress: bool = False, threads: int | None = None
              ) -> dict[str, Any]:
    """Train one model from its `dwakd train` config tree; returns wall/CPU seconds, steps and the mean loss.

    `threads`: torch threads for this job only (the worker's own setting is restored after it)."""
    import torch

    from dwakd.config import config_from_dict
    from dwakd.run import train

    previous = torch.get_num_threads()
    if threads:
        set_threads(threads)
    if any(Path(tree["training"]["output_dir"]).glob("checkpoint-*")):  # an interrupted run of this stage
        tree = {**tree, "training": {**tree["training"], "resume_from_checkpoint": "last"}}
    started, cpu = time.perf_counter(), time.process_time()
    try:
        result = train(config_from_dict(tree, f"demo {label}"), show_progress=show_progress)
    finally:
        set_threads(previous)
    if result.get("interrupted"):  # raised here, so that a job run in the demo's own process stops it at once
        raise DemoInterrupted(f"{label}: interrupted at step {result['global_step']}, checkpoint saved in "
                              f"{result['output_dir']}; run the same command again to continue")
    return {"seconds": round(time.perf_counter() - started, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
            "global_step": result["global_step"], "train_loss": result["train_loss"]}


def eval_job(models: dict[str, str], datasets: list[tuple[str, str, str]], out_dir: str, seeds: Sequence[int],
             generation: dict[str, Any], show_progress: bool = False) -> dict[str, Any]:
    """Generate and score `models` on `datasets` ((name, path, title)); returns the ScoreTable as JSON + CPU seconds."""
    from dwakd.evaluation.datasets import DatasetSpec, load_eval_dataset
    from dwakd.evaluation.generation import GenerationSettings
    from dwakd.evaluation.runner import run_evaluation

    started, cpu = time.perf_counter(), time.process_time()
    specs = [load_eval_dataset(DatasetSpec(name, path, title=title)) for name, path, title in datasets]
    table = run_evaluation(models, specs, out_dir, seeds=seeds, settings=GenerationSettings(**generation),
                           device="cpu", progress=show_progress, write_files=False)
    return {"table": table.to_json(), "seconds": round(time.perf_counter() - started, 2),
            "cpu_seconds": round(time.process_time() - cpu, 2)}


def cache_job(tree: dict[str, Any], out_dir: str, settings: dict[str, Any], show_progress: bool = False
              ) -> dict[str, Any]:
    """Build the teacher cache of run config `tree` (`dwakd teacher-cache`); returns seconds, examples and sizes."""
    from dwakd.config import config_from_dict
    from dwakd.teacher_cache import CacheSettings, build_teacher_cache

    started, cpu = time.perf_counter(), time.process_time()
    cache_settings = CacheSettings(k=settings["k"] or None, layers=tuple(settings["layers"]),
                                   temperatures=tuple(settings["temperatures"]), tail_rank=settings.get("tail_rank"))
    manifest = build_teacher_cache(config_from_dict(tree, "demo teacher cache"), out_dir, cache_settings,
                                   show_progress=show_progress)
    return {"seconds": round(time.perf_counter() - started, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
            "examples": manifest["examples"]["unique"], "sizes": manifest["sizes"]}


@dataclass
class _Job:
    label: str  # "teacher", a student name, or CACHE_LABEL
    method: str
    folder: Path
    key: str
    tree: dict[str, Any]
    after: str | None  # the label of the job whose output it reads (teacher, teacher cache), if any
    kind: str = "train"  # "train" (then evaluated) or "cache" (the teacher cache)


class _Runner:
    """Runs jobs in this process (one worker) or on a pool of spawned worker processes."""

    def __init__(self, workers: int, threads: int, log_file: Path | None):
        self.workers, self.threads = workers, threads
        self.pool = None
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init,
                                            initargs=(threads, str(log_file or ""), os.getpid()))
        else:
            set_threads(threads)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the caller through the future, as a pool would
            future.set_exception(exc)
        return future

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


@dataclass
class DemoResult:
    """What a demo run produced: paths, the score tables, the claims and the run log."""

    output_dir: Path
    report: Path
    table: Any  # ScoreTable over training seeds (students) and sampling seeds (teacher)
    sampling_table: Any  # ScoreTable of the first training seed's students over sampling seeds (descriptive)
    evaluation: Any  # ScoreTable of every evaluated model (rows `teacher`, `<method>-seed<k>`) over sampling seeds
    checks: list[Any]  # report.Check: the ranking claims over training seeds
    log: RunLog

    @property
    def cached(self) -> dict[str, bool]:
        return self.log.cached

    @property
    def timings(self) -> dict[str, float]:
        return self.log.wall_seconds


def resolve_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Method names with `all` expanded to every registered method (sft, dskd, dwakd first); each name checked."""
    from dwakd.methods import get_method, method_names

    names: list[str] = []
    for name in methods:
        expanded = [*DEFAULT_METHODS, *(m for m in method_names() if m not in DEFAULT_METHODS)] \
            if name == ALL_METHODS else [name]
        for method in expanded:
            get_method(method)  # an unknown name fails here, before any work, with the closest valid one
            if method not in names:
                names.append(method)
    return tuple(names)


class DemoPipeline:
    """Runs the demo stage by stage; each stage is cached under a fingerprint in `output_dir`."""

    def __init__(self, settings: DemoSettings, output_dir: str | Path, *, force: bool = False,
                 show_progress: bool = True, echo: Callable[[str], None] = print, workers: int | None = None,
                 keep_going: bool = False):
        self.settings = settings
        self.out = Path(output_dir)
        self.force = force
        self.show_progress = show_progress
        self.echo = echo
        self.workers = workers  # None: one worker process per free core
        self.keep_going = keep_going  # a student that fails to train is reported instead of stopping the run
        self.methods = resolve_methods(settings.methods)
        self.log = RunLog(versions=library_versions())
        self._eval_cleared = False
        self.code_key = code_fingerprint()

    def portable(self, value: Any) -> Any:
        """`value` with every path inside the output folder written relative to it, for stage fingerprints: a demo
        folder that is moved or copied keeps its cached stages (its contents are what the keys vouch for)."""
        if isinstance(value, dict):
            return {k: self.portable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.portable(v) for v in value]
        if isinstance(value, Path) or (isinstance(value, str) and "/" in value):  # names and options stay as they are
            try:
                return "<output>/" + Path(value).resolve().relative_to(self.out.resolve()).as_posix()
            except ValueError:  # outside the output folder (a user's file, a hub name)
                return str(value)
        return value

    # ---- stages ---------------------------------------------------------------------------------------------------
    def _timed(self, name: str, fn: Callable[[], Any], threads: int | None = None) -> Any:
        self.log.threads[name] = set_threads(threads)
        started, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
        result = fn()
        self.log.wall_seconds[name] = round(time.perf_counter() - started, 2)
        self.log.cpu_seconds[name] = round(time.process_time() - cpu + _children_cpu() - children, 2)
        return result

    def build_data(self) -> dict[str, Path]:
        """Write the suite's splits (cached by suite sizes and the code)."""
        folder = self.out / "data"
        key = fingerprint(suite_fingerprint(self.settings.suite), self.code_key)
        names = ["train", "student_train", *DEV_SPLITS, *TEST_SPLITS]
        paths = {name: folder / f"{name}.jsonl" for name in names}
        self.log.cached["suite"] = _cached(folder, key, self.force)
        if not self.log.cached["suite"]:
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
        key = fingerprint(self.data_key, self.settings.tokenizers.fingerprint(), self.code_key)
        self.log.cached["tokenizers"] = _cached(folder, key, self.force)
        paths = {"teacher": folder / "teacher", "student": folder / "student"}
        if not self.log.cached["tokenizers"]:
            folder.mkdir(parents=True, exist_ok=True)
            train_tokenizers(corpus_text(data, limit=8000), self.settings.tokenizers, folder)
            from dwakd.demo.suite import read_jsonl
            from dwakd.tokenizers import load_tokenizer

            teacher, student = (load_tokenizer(str(paths[r])) for r in ("teacher", "student"))
            agreement = {}
            for split in ("student_train", *TEST_SPLITS):
                texts = []
                for row in read_jsonl(data[split])[:500]:
                    refs = [row["output"]] if isinstance(row["output"], str) else row["output"]
                    texts.append(f"{row['instruction']} {row['input']} {refs[0]}")
                agreement[split] = boundary_agreement(teacher, student, texts)
            info = {"teacher": {"type": "byte-level BPE", "vocab_size": len(teacher)},
                    "student": {"type": "WordPiece", "vocab_size": len(student)},
                    "test_split_agreement": agreement["test"], "split_agreement": agreement}
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
                        "tiny": {**s.teacher_model, **self._special_ids(tokenizers["teacher"])},
                        "seed": s.teacher_init_seed},
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
                        "tiny": {**s.student_model, **self._special_ids(tokenizers["student"])},
                        "seed": s.student_init_seed},
            "teacher": {"name_or_path": str(teacher_dir)},
            "data": {"train": str(data["student_train"]), "max_prompt_length": s.max_prompt_length,
                     "max_length": s.max_length},
            "method": {"name": method, "options": dict(s.method_options.get(method, {})),
                       "projector_lr": s.projector_lr},
            "training": self._training_block(s.student_training, output_dir),
            "seed": seed,
        }

    def relocate_generations(self, out_dir: Path, models: dict[str, Path], datasets: Sequence[tuple[str, str, str]]
                             ) -> None:
        """Point saved generations of a moved or copied demo folder at this folder's models and test sets.

        Their meta.json names the model and test-set paths they were made from, which the evaluation compares
        before reusing them; in a copied folder those are the old folder's. A stored path is rewritten only when it
        ends with the same path relative to the output folder as the current one (`students/dskd-seed0`,
        `data/test.jsonl`): the same stage, which the stage fingerprints already vouch for.
        """
        for label, folder in models.items():
            for name, path, _ in datasets:
                meta_path = Path(out_dir) / "generations" / label / name / "meta.json"
                if not meta_path.is_file():
                    continue
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                moved = {key: now for key, now in (("model", str(folder)), ("dataset", path))
                         if isinstance(meta.get(key), str) and meta[key] != now and self._same_place(meta[key], now)}
                if moved:
                    meta_path.write_text(json.dumps({**meta, **moved}, indent=2), encoding="utf-8")

    def _same_place(self, stored: str, current: str) -> bool:
        """Whether `stored` is `current`'s place inside another copy of the output folder."""
        try:
            relative = Path(current).resolve().relative_to(self.out.resolve()).parts
        except ValueError:  # not inside the output folder: no other copy of it can hold it
            return False
        return len(Path(stored).parts) > len(relative) and Path(stored).parts[-len(relative):] == relative

    def _forget_generations(self, model_name: str) -> None:
        """A retrained model's old generations must not be reused by the resumable evaluation."""
        folder = self.out / "eval" / "generations" / model_name
        if folder.exists():
            shutil.rmtree(folder)

    def teacher_cache_methods(self) -> tuple[list[str], dict[str, str]]:
        """With a teacher cache: (the methods whose students read the cache, {method: why the cache cannot serve
        it, so it trains with the live teacher}); methods without a teacher (sft) are in neither."""
        from dwakd.methods import get_method
        from dwakd.teacher_cache import cache_refusal

        served: list[str] = []
        live: dict[str, str] = {}
        for method in self.methods:
            method_cls = get_method(method)[0]
            if not method_cls.needs_teacher:
                continue
            why = cache_refusal(method_cls, lossless=self.settings.teacher_cache_k in (0, "head"))
            if why:
                live[method] = why
            else:
                served.append(method)
        return served, live

    def check_method_requirements(self) -> None:
        """Build each method's text annotator (MTA's spaCy chunker) before anything trains, so a missing optional
        dependency is known at once rather than after the teacher. A method the user named stops the run with the
        install hint; with `--methods all` / `--table paper` it is left out, said here and in the report."""
        from dwakd.config import ConfigError
        from dwakd.methods import build_options, get_method

        for method in self.methods:
            method_cls = get_method(method)[0]
            try:
                method_cls.text_annotator(build_options(method, self.settings.method_options.get(method, {})))
            except ConfigError as error:
                if not self.keep_going:
                    raise
                self.log.failed[method] = f"not run: {error}"
                self.echo(f"  {method}: not run ({error})")
        self.methods = tuple(m for m in self.methods if m not in self.log.failed)

    def cache_settings(self) -> dict[str, Any]:
        """What the demo's teacher cache stores: K (0: lossless), the tail rank of a top-K cache (the builder's
        default), and the hidden-state layers and tail temperatures that any registered method reads with the demo's
        options — the same for every `--methods` choice, so adding methods to a run never rebuilds the cache (nor
        retrains the students that read it)."""
        from dwakd.methods import build_options, get_method, method_names
        from dwakd.teacher_cache import CacheSettings

        layers, temperatures = set(), {1.0, 2.0}
        for name in method_names():
            method_cls = get_method(name)[0]
            if method_cls.needs_teacher:
                layers |= set(method_cls.teacher_layers)
                options = build_options(name, self.settings.method_options.get(name, {}))
                temperatures.add(float(method_cls.teacher_temperature(options)))
        k = self.settings.teacher_cache_k
        tail_rank = CacheSettings(k=k if isinstance(k, int) and k > 0 else None).tail_rank
        return {"k": k, "layers": sorted(layers), "temperatures": sorted(temperatures), "tail_rank": tail_rank}

    def training_jobs(self, data: dict[str, Path], tokenizers: dict[str, Path]) -> list[_Job]:
        """The teacher's job, the teacher cache's (unless `--live-teacher`) and one job per (method, training seed),
        each with its cache fingerprint."""
        from dwakd.methods import get_method

        teacher_dir = self.out / "teacher"
        tree = self.teacher_config(data, tokenizers)
        training = {k: v for k, v in tree["training"].items() if k != "disable_tqdm"}
        self.teacher_key = fingerprint(self.tokenizer_key,
                                       self.portable({k: v for k, v in tree.items() if k != "training"}),
                                       self.portable(training))
        jobs = [_Job("teacher", "sft", teacher_dir, self.teacher_key, tree, None)]
        cache = self._cache_job(data, tokenizers, teacher_dir)
        if cache is not None:
            jobs.append(cache)
        for method in self.methods:  # method-major: a method's training seeds finish together
            for seed in self.settings.train_seeds:
                name = student_name(method, seed)
                folder = self.out / "students" / name
                tree = self.student_config(data, tokenizers, method, seed, teacher_dir, folder)
                uses_teacher = get_method(method)[0].needs_teacher
                settings_part = {k: v for k, v in tree.items() if k not in ("teacher", "training")}
                training_part = {k: v for k, v in tree["training"].items() if k != "disable_tqdm"}
                key = fingerprint(self.tokenizer_key, self.teacher_key if uses_teacher else None,
                                  self.portable(settings_part), self.portable(training_part))
                after = "teacher" if uses_teacher else None
                if cache is not None and method in self.log.teacher_cache["served"]:
                    tree["teacher"]["cache"] = str(cache.folder)
                    key = fingerprint(key, CACHE_LABEL, cache.key)
                    after = CACHE_LABEL
                jobs.append(_Job(name, method, folder, key, tree, after))
        return jobs

    def _cache_job(self, data: dict[str, Path], tokenizers: dict[str, Path], teacher_dir: Path) -> _Job | None:
        """With a teacher cache: the job that builds the cache the students read (None when none reads one)."""
        k = self.settings.teacher_cache_k
        if k is None:
            return None
        served, live = self.teacher_cache_methods()
        mode = "lossless" if not k else "head-mode" if k == "head" else f"top-{k}"
        folder = self.out / "teacher_cache"
        settings = self.cache_settings()
        self.log.teacher_cache = {"k": k, "mode": mode, "folder": folder.name, "served": served, "live": live,
                                  "settings": settings}
        for method, why in live.items():
            message = (f"--teacher-cache: the cache cannot serve {method} ({why}); its students train with the "
                       "live teacher")
            self.echo(f"  {message}")
        if not served:
            self.echo("  teacher cache: no method of this run reads one; none is built")
            return None
        # the students' data and lengths; the method only names a default temperature, which `settings` fixes
        tree = self.student_config(data, tokenizers, served[0], self.settings.train_seeds[0], teacher_dir, folder)
        key = fingerprint(self.teacher_key, self.portable(tree["teacher"]), self.portable(tree["data"]), settings,
                          {name: tree["training"][name] for name in ("use_cpu", "bf16")}, self.code_key)
        self.echo(f"  teacher cache: students of {', '.join(served)} read a {mode} teacher cache ({folder}) built "
                  "once after the teacher, instead of running it")
        return _Job(CACHE_LABEL, "", folder, key, tree, "teacher", kind="cache")

    def _eval_setup(self, data: dict[str, Path], splits: Sequence[str], out_dir: Path) -> tuple[list, dict[str, Any]]:
        """(datasets as (name, path, title), generation settings) for `eval_job`; clears stale generations."""
        from dwakd.evaluation.generation import GenerationSettings

        s = self.settings
        datasets = [(name, str(data[name]), SPLIT_TITLES[name]) for name in splits]
        settings = GenerationSettings(max_prompt_length=s.max_prompt_length, max_length=s.max_length,
                                      max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch_size)
        # Generations are resumable per model; they stay valid while the test sets, the decoding settings and the
        # code do (a retrained model's folder is removed before it trains).
        key = fingerprint(self.data_key, settings.fingerprint(), self.code_key)
        if not _cached(out_dir, key, self.force and not self._eval_cleared):
            out_dir.mkdir(parents=True, exist_ok=True)
            _mark(out_dir, key, {})
        self._eval_cleared = True
        generation = {k: getattr(settings, k) for k in ("max_prompt_length", "max_length", "max_new_tokens",
                                                         "batch_size")}
        return datasets, generation

    def train_and_evaluate(self, data: dict[str, Path], tokenizers: dict[str, Path],
                           splits: Sequence[str] = tuple(TEST_SPLITS), out_dir: Path | None = None):
        """Train every model not cached and evaluate every model, as jobs on one pool of worker processes.

        Order: the teacher and the teacher-free students (SFT) first; each model's evaluation as soon as it is
        trained; the distilled students as soon as the teacher is saved. Returns (model folders, ScoreTable).
        """
        from dwakd.evaluation.report import ScoreTable

        jobs = self.training_jobs(data, tokenizers)
        datasets, generation = self._eval_setup(data, splits, out_dir or self.out / "eval")
        self.relocate_generations(out_dir or self.out / "eval", {job.label: job.folder for job in jobs}, datasets)
        out_dir = str(out_dir or self.out / "eval")
        pending: list[_Job] = []
        for job in jobs:
            if job.kind == "cache":  # decided below, once it is known whether any student needs it
                continue
            self.log.cached[job.label] = _cached(job.folder, job.key, self.force)
            if self.log.cached[job.label]:
                self.log.train_info[job.label] = _stage_info(job.folder)
                self.echo(f"  {job.label}: reusing {job.folder} (same settings and code)")
            else:
                self._forget_generations(job.label)
                pending.append(job)
        for job in jobs:
            if job.kind == "cache" and self._cache_needed(job, pending):
                pending.insert(1 if pending and pending[0].label == "teacher" else 0, job)
        models_to_train = [job for job in pending if job.kind == "train"]
        evaluated = [job for job in jobs if job.kind == "train"]
        workers, threads = plan_workers(len(evaluated), choose_threads(), self.workers)
        self.log.workers["models"], self.log.threads["models"] = workers, threads
        self.echo(f"  {len(models_to_train)} models to train, {len(evaluated)} to evaluate, on {workers} worker "
                  f"process(es) × {threads} torch thread(s)")
        inline_progress = self.show_progress and workers == 1
        runner = _Runner(workers, threads, self.out / "demo.log")
        # a job waits for the job it reads (teacher, teacher cache) only while that one is still to run
        pending_labels = {job.label for job in pending}
        waiting: dict[str, list[_Job]] = {}
        for job in pending:
            if job.after in pending_labels:
                waiting.setdefault(job.after, []).append(job)
        blocked = {job.label for queued in waiting.values() for job in queued}
        running: dict[Future, tuple[str, _Job]] = {}
        tables: dict[str, dict[str, Any]] = {}

        def submit_eval(job: _Job) -> None:
            future = runner.submit(eval_job, {job.label: str(job.folder)}, datasets, out_dir,
                                   tuple(self.settings.eval_seeds), generation, inline_progress)
            running[future] = ("eval", job)

        def submit(job: _Job) -> None:
            if job.kind == "cache":
                future = runner.submit(cache_job, job.tree, str(job.folder), self.log.teacher_cache["settings"],
                                       inline_progress)
            else:
                # the teacher is the critical path: every distilled student waits for it, and once the few
                # students that need no teacher are done the other workers idle, so it gets every core
                teacher_threads = workers * threads if job.label == "teacher" and workers > 1 else None
                job.folder.mkdir(parents=True, exist_ok=True)
                _mark(job.folder, job.key, {"in_progress": True})  # a rerun continues this job, not restarts it
                future = runner.submit(train_job, job.tree, job.label, inline_progress, teacher_threads)
            running[future] = (job.kind, job)

        try:
            for job in jobs:
                if job.label in pending_labels and job.label not in blocked:
                    submit(job)
                elif job.label not in pending_labels and job.kind == "train":
                    submit_eval(job)
            while running:
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    kind, job = running.pop(future)
                    if kind == "eval":
                        result = future.result()
                        tables[job.label] = result["table"]
                        self.log.train_info.setdefault(job.label, {})["eval_cpu_seconds"] = result["cpu_seconds"]
                        self.log.train_info[job.label]["eval_seconds"] = result["seconds"]
                        continue
                    if kind == "cache":
                        self._finish_cache(job, future)
                    elif self._finish_training(job, future):
                        submit_eval(job)
                    else:
                        continue
                    for queued in waiting.pop(job.label, []):
                        submit(queued)
        finally:
            runner.close()
        models = {job.label: job.folder for job in evaluated
                  if job.label == "teacher" or job.method not in self.log.failed}
        table = ScoreTable([(name, title) for name, _, title in datasets])
        for name in models:  # rows in job order: teacher, then students by seed and method
            for dataset, per_seed in tables.get(name, {}).get("scores", {}).get(name, {}).items():
                for seed, value in per_seed.items():
                    table.add(name, dataset, int(seed), value)
        return models, table

    def _cache_needed(self, job: _Job, pending: list[_Job]) -> bool:
        """Whether the teacher cache has to be built: not reusable, and some student to train reads it."""
        teacher_retrained = any(queued.label == "teacher" for queued in pending)
        reused = _cached(job.folder, job.key, self.force or teacher_retrained)
        readers = [queued.label for queued in pending if queued.after == job.label]
        if reused:
            self.log.cached[job.label] = True
            self.log.teacher_cache.update({k: v for k, v in _stage_info(job.folder).items() if k != "fingerprint"})
            self.echo(f"  {job.label}: reusing {job.folder} (same teacher, data, settings and code)")
            return False
        if not readers:
            self.echo(f"  {job.label}: not needed (every student that reads it is reused)")
            return False
        self.log.cached[job.label] = False
        return True

    def _finish_cache(self, job: _Job, future: Future) -> None:
        """Record the finished teacher cache (a failed build stops the run: its students cannot train)."""
        error = future.exception()
        if error is not None:
            raise error
        info = future.result()
        _mark(job.folder, job.key, info)
        self.log.teacher_cache.update(info)
        size = (info["sizes"]["shard_bytes"] + info["sizes"]["table_bytes"]) / 2**20
        self.echo(f"  {job.label}: {info['examples']} examples in {info['seconds']:.0f} s "
                  f"({info['cpu_seconds']:.0f} CPU-s), {self.log.teacher_cache['mode']}, {size:.1f} MiB")

    def _finish_training(self, job: _Job, future: Future) -> bool:
        """Record a finished training job; False when it failed and the run goes on without its method."""
        error = future.exception()
        if error is not None:
            if job.label == "teacher" or not self.keep_going or isinstance(error, DemoInterrupted):
                raise error  # an interrupted job keeps its `in_progress` marker: a rerun continues it
            self.log.failed.setdefault(job.method, f"{job.label}: {type(error).__name__}: {error}")
            self.echo(f"  {job.label}: FAILED ({type(error).__name__}: {error})")
            return False
        info = future.result()
        _mark(job.folder, job.key, info)
        self.log.train_info[job.label] = dict(info)
        self.echo(f"  {job.label}: {info['global_step']} steps in {info['seconds']:.0f} s "
                  f"({info['cpu_seconds']:.0f} CPU-s), mean loss {info['train_loss']:.3f}")
        return True

    # ---- the whole run ------------------------------------------------------------------------------------------
    def run(self) -> DemoResult:
        """All stages, then the report; returns paths, tables, the claims and the run log."""
        self.out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.out / "demo.log", mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            started, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
            self.log.load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            self.check_method_requirements()
            (self.out / "demo_config.yaml").write_text(
                yaml.safe_dump({**self.settings.to_dict(), "methods": list(self.methods)}, sort_keys=False),
                encoding="utf-8")
            self.echo(f"[1/4] instruction suite (version {SUITE_VERSION})")
            data = self._timed("suite", self.build_data)
            self.echo("[2/4] tokenizers: byte-level BPE (teacher), WordPiece (student)")
            tokenizers = self._timed("tokenizers", lambda: self.build_tokenizers(data))
            self.echo(f"[3/4] teacher (Llama, sft on the whole train split) and students (GPT-2; "
                      f"{', '.join(self.methods)}; training seeds {', '.join(map(str, self.settings.train_seeds))})")
            self.echo(f"      each model evaluated once trained: sampling, ROUGE-L, seeds "
                      f"{', '.join(map(str, self.settings.eval_seeds))}")
            _, full = self._timed("models", lambda: self.train_and_evaluate(data, tokenizers))
            self.log.wall_seconds["total"] = round(time.perf_counter() - started, 2)
            self.log.cpu_seconds["total"] = round(time.process_time() - cpu + _children_cpu() - children, 2)
            self.echo("[4/4] report (total above: every stage before it)")
            report = write_demo_report(self.out, self.settings, self.log, full, data, tokenizers, self.methods,
                                       echo=self.echo)
            return DemoResult(self.out, report.path, report.seed_table, report.sampling_table, full, report.checks,
                              self.log)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()

def run_demo(output_dir: str | Path, *, quick: bool = False, methods: Sequence[str] | None = None,
             eval_seeds: Sequence[int] | None = None, train_seeds: Sequence[int] | None = None, force: bool = False,
             show_progress: bool = True, echo: Callable[[str], None] = print, workers: int | None = None,
             settings: DemoSettings | None = None, teacher_cache_k: int | str | None = None,
             teacher_steps: int | None = None, student_steps: int | None = None) -> DemoResult:
    """Run the demo with the preset for `quick` (or given settings), optionally other methods / seeds / step
    budgets; `teacher_cache_k` overrides the preset's teacher cache (K, 0: lossless, "head": head mode;
    `LIVE_TEACHER`: none)."""
    settings = settings or demo_settings(quick)
    if teacher_cache_k is not None:
        settings.teacher_cache_k = None if teacher_cache_k == LIVE_TEACHER else teacher_cache_k
    if teacher_steps:
        settings.teacher_training = {**settings.teacher_training, "max_steps": teacher_steps}
    if student_steps:
        settings.student_training = {**settings.student_training, "max_steps": student_steps}
    if methods:
        settings.methods = tuple(methods)
    if eval_seeds:
        settings.eval_seeds = tuple(eval_seeds)
    if train_seeds:
        settings.train_seeds = tuple(train_seeds)
    keep_going = ALL_METHODS in settings.methods
    return DemoPipeline(settings, output_dir, force=force, show_progress=show_progress, echo=echo, workers=workers,
                        keep_going=keep_going).run()
