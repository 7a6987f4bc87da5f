"""Benchmark: the offline teacher (`dwakd teacher-cache`) — accuracy of top-k and head-mode caches, sizes, speed,
build time.

    # accuracy of top-k and head-mode caches vs the live (dense) teacher, per teacher token, for k / value bits /
    # hidden dtypes
    PYTHONPATH=src python benchmarks/teacher_cache.py accuracy configs/tiny-cpu.yaml --examples 32 \
        --out benchmarks/results/teacher_cache_accuracy_tiny.json
    PYTHONPATH=src python benchmarks/teacher_cache.py accuracy runs/demo/students/dskd/dwakd_config.yaml \
        --student-dir runs/demo/students/dskd --examples 64 --out benchmarks/results/teacher_cache_accuracy_demo.json
    # rank-R tails, measured on 64 examples after the 400 the tail basis is fitted on (the default demo's run)
    PYTHONPATH=src python benchmarks/teacher_cache.py accuracy runs/demo/students/dskd-seed0/dwakd_config.yaml \
        teacher.cache=null --student-dir runs/demo/students/dskd-seed0 --examples 64 --fit-examples 400 \
        --modes topk rank head --out benchmarks/results/teacher_cache_accuracy_demo_rank.json
    # step time and peak memory (process RSS on CPU), live teacher vs cache, interleaved rounds, and build time
    PYTHONPATH=src python benchmarks/teacher_cache.py speed configs/tiny-cpu.yaml --methods dskd dwakd --rounds 3 \
        --build-examples 200 --out benchmarks/results/teacher_cache_speed_tiny.json
    # the real-size pair (Qwen1.5-1.8B-shaped teacher, GPT-2-shaped student) on CPU in float32, a few steps
    PYTHONPATH=src python benchmarks/teacher_cache.py speed configs/bench/real-size-gpu.yaml teacher.dtype=float32 \
        training.bf16=false --methods dskd dwakd --warmup 1 --steps 2 --rounds 1 \
        --out benchmarks/results/teacher_cache_speed_real_size_cpu.json
    # what a rank-R tail adds to materialising top-k rows in training (flat vs rank-R, alternating rounds)
    PYTHONPATH=src python benchmarks/teacher_cache.py materialise --rows 256 --vocab 151646 --k 64 --ranks 32 64 \
        --out benchmarks/results/teacher_cache_materialise_cpu.json
    # hashing cost of teacher weight files (the fingerprint)
    PYTHONPATH=src python benchmarks/teacher_cache.py fingerprint configs/bench/real-size-gpu.yaml

accuracy: caches are built with the real builder for each variant (k or head mode, value bits, hidden dtype, tail
rank) over the first `--fit-examples` + `--examples` training examples and measured on the last `--examples` (a
rank-R tail's basis is fitted on the first rows of the data, at most 4,096: with `--fit-examples` covering them the
measured rows are ones the basis was not fitted on; each result records whether they were); for every
batch the same student and method objects (optionally a trained student:
`--student-dir`) run once with the live teacher and once with each cache. Per teacher token it records KL(p_τ ‖ p̂_τ)
(how far the cached teacher distribution is from the dense one, τ = 1 and 2), the error of dskd's teacher-space KL
term (s2t_div, at the method's τ = 2) and of the per-row weights DWA-KD computes from the teacher (u_j, τ = 1); per
batch the relative error of the dskd and dwakd losses; and the bytes per teacher token of the logit and hidden parts.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dwakd.config import load_config  # noqa: E402
from dwakd.interface import DistillationInputs, TokenView  # noqa: E402
from dwakd.run import build_training  # noqa: E402
from dwakd.teacher_cache import CacheSettings, TeacherCache, build_teacher_cache, example_key  # noqa: E402
from dwakd.trainer import DistillationModel  # noqa: E402

VIEW_KEYS = ("input_ids", "attention_mask", "labels", "input_offsets", "label_offsets")
VARIANTS = [  # (k, value_bits, hidden_dtype, tail_rank); k = "head": no logits, recomputed from the final hidden state
    (16, 13, "float16", 0), (64, 13, "float16", 0), (256, 13, "float16", 0),
    (64, 10, "float16", 0), (64, 15, "float16", 0),
    (64, 13, "bfloat16", 0), (64, 13, "int8", 0), (64, 13, "float32", 0),
    (16, 13, "float16", 32), (64, 13, "float16", 16), (64, 13, "float16", 32), (64, 13, "float16", 44),
    (64, 10, "float16", 64), (256, 13, "float16", 32),
    ("head", 13, "float32", 0), ("head", 13, "float16", 0), ("head", 13, "bfloat16", 0), ("head", 13, "int8", 0),
]


def variant_mode(k, tail_rank: int) -> str:
    return "head" if k == "head" else "rank" if tail_rank else "topk"


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "cpu": platform.processor()}


def _inputs(model: DistillationModel, batch: dict, cached: bool) -> DistillationInputs:
    """What DistillationModel.forward hands the method (both views), without the loss."""
    student = TokenView(*(batch[k] for k in VIEW_KEYS))
    teacher = TokenView(*(batch[f"teacher_{k}"] for k in VIEW_KEYS))
    s_out = model._run_side("student", model.student, student, True, model.student_vocab_size)
    if cached:
        t_out = model.teacher.model_view(batch, teacher, model.teacher_vocab_size)
    else:
        t_out = model._run_side("teacher", model.teacher, teacher, True, model.teacher_vocab_size)
    return DistillationInputs(student, teacher, s_out, t_out, student.label_mask.sum().clamp_min(1), 0.5, 0)


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "max": max(values), "n": len(values)} if values else {}


@torch.no_grad()
def _accuracy_one(runs: dict, cache_dir: Path, batches: list[list], vocab: int) -> dict:
    """Errors of one cache against the live teacher, over `batches` of examples."""
    from dwakd.modules.token_weights import teacher_token_weights

    cache = TeacherCache(cache_dir)
    teacher = cache.teacher_module()
    out: dict = {"kl_1": [], "kl_2": [], "s2t_div_abs_err": [], "s2t_div_live": [], "u_abs_err": [],
                 "loss_rel_err": {name: [] for name in runs}}
    for name, run in runs.items():
        teacher.configure_for(run.model.method)
        cached = DistillationModel(run.model.student, run.model.method, teacher, run.model.student_vocab_size,
                                   run.model.teacher_vocab_size)
        collate = cache.collator(run.trainer.data_collator)
        for examples in batches:
            batch = collate(examples)
            live_in, cache_in = _inputs(run.model, batch, False), _inputs(cached, batch, True)
            live_loss = run.model.method(live_in).loss
            cache_loss = run.model.method(cache_in).loss
            out["loss_rel_err"][name].append(float((cache_loss - live_loss).abs() / live_loss.abs()))
            if name != "dskd":
                continue
            method = run.model.method
            live_terms = method.dual_space_terms(live_in, method.align_spaces(live_in))
            cache_terms = method.dual_space_terms(cache_in, method.align_spaces(cache_in))
            out["s2t_div_abs_err"] += (cache_terms.s2t_div - live_terms.s2t_div).abs().tolist()
            out["s2t_div_live"] += live_terms.s2t_div.tolist()
            mask = live_terms.teacher_mask
            u_live = teacher_token_weights(live_terms.teacher_logits, mask, vocab).weights[mask]
            u_cache = teacher_token_weights(cache_terms.teacher_logits, mask, vocab).weights[mask]
            out["u_abs_err"] += (u_cache - u_live).abs().tolist()
            p = live_terms.teacher_logits[:, :vocab].double()
            q = cache_terms.teacher_logits[:, :vocab].double()
            for tau in (1.0, 2.0):
                lp, lq = torch.log_softmax(p / tau, -1), torch.log_softmax(q / tau, -1)
                out[f"kl_{int(tau)}"] += (lp.exp() * (lp - lq)).sum(-1).tolist()
    sizes = cache.manifest["sizes"]
    return {
        "kl_tau1": _stats(out["kl_1"]), "kl_tau2": _stats(out["kl_2"]),
        "s2t_kl_term_abs_err": _stats(out["s2t_div_abs_err"]), "s2t_kl_term_live": _stats(out["s2t_div_live"]),
        "teacher_weight_abs_err": _stats(out["u_abs_err"]),
        "loss_rel_err": {name: _stats(v) for name, v in out["loss_rel_err"].items()},
        "logit_bytes_per_token": sizes["logit_bytes_per_token"],
        "hidden_bytes_per_token": sizes["hidden_bytes_per_token"],
        "build_seconds": cache.manifest["build_seconds"], "examples": cache.manifest["examples"]["unique"],
    }


def _parse_variant(text: str) -> tuple:
    """"K,BITS,DTYPE,RANK" (K an integer or head) -> a VARIANTS entry."""
    k, bits, dtype, rank = text.split(",")
    return (k if k == "head" else int(k)), int(bits), dtype, int(rank)


def cmd_accuracy(args) -> dict:
    total = args.fit_examples + args.examples
    overrides = [*args.overrides, "data.eval=null", f"data.max_train_examples={total}",
                 f"training.per_device_train_batch_size={args.batch_size}"]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dwakd-tcache-acc-"))
    runs = {}
    for method in ("dskd", "dwakd"):
        config = load_config(args.config, [*overrides, f"method={method}", f"output_dir={work / method}",
                                           "method.options={}"])
        run = build_training(config, show_progress=False)
        if args.student_dir:
            from dwakd.checkpoints import load_method_state, load_student_weights

            given = Path(args.student_dir)  # dskd's dir; dwakd's is its sibling (runs/demo/students/dwakd-seed0)
            student_dir = given.parent / given.name.replace("dskd", method, 1)
            load_student_weights(run.model.student, student_dir)
            load_method_state(run.model.method, student_dir)
        run.model.eval()
        runs[method] = run
    config = runs["dskd"].config
    dataset = runs["dskd"].train_dataset
    # measured: the examples after the first --fit-examples whose teacher side none of those repeats (the data may
    # hold duplicates); a basis fitted within the first --fit-examples has seen none of the measured rows
    before = {example_key(dataset.examples[i].teacher) for i in range(min(args.fit_examples, len(dataset)))}
    measured = [i for i in range(args.fit_examples, len(dataset))
                if example_key(dataset.examples[i].teacher) not in before]
    batches = [[dataset[i] for i in measured[s : s + args.batch_size]]
               for s in range(0, len(measured), args.batch_size)]
    vocab = runs["dskd"].model.teacher_vocab_size
    results = []
    for k, value_bits, hidden_dtype, tail_rank in args.variant or VARIANTS:
        if variant_mode(k, tail_rank) not in args.modes:
            continue
        cache_dir = work / f"cache-k{k}-v{value_bits}-{hidden_dtype}-r{tail_rank}"
        started = time.perf_counter()
        manifest = build_teacher_cache(config, cache_dir, CacheSettings(k=k, value_bits=value_bits,
                                                                        hidden_dtype=hidden_dtype,
                                                                        tail_rank=tail_rank), show_progress=False)
        result = {"k": k, "value_bits": value_bits, "hidden_dtype": hidden_dtype, "tail_rank": tail_rank,
                  **_accuracy_one(runs, cache_dir, batches, vocab)}
        fit = manifest["settings"].get("tail_fit")
        if fit:
            result["tail_fit"] = {**fit, "effective_rank": manifest["settings"]["tail_rank"],
                                  "measured_rows_outside_the_fit": fit["examples"] <= args.fit_examples}
        result["measure_seconds"] = round(time.perf_counter() - started, 1)
        results.append(result)
        print(json.dumps({key: result.get(key) for key in ("k", "value_bits", "hidden_dtype", "tail_rank", "kl_tau1",
                                                             "kl_tau2", "logit_bytes_per_token", "tail_fit")}),
              flush=True)
    return {"config": args.config, "overrides": args.overrides, "student_dir": args.student_dir,
            "examples": len(measured), "fit_examples": args.fit_examples, "teacher_vocab": vocab,
            "environment": environment(), "command": " ".join(sys.argv), "results": results}


def _bench_in_child(variant: dict, method: str, batch_size: int, warmup: int, steps: int, work_dir: str) -> dict:
    """`bench_one` in this (child) process: its RSS peak belongs to this measurement alone."""
    import dataclasses

    from dwakd.evaluation.efficiency import bench_one

    torch.set_num_threads(int(os.environ.get("DWAKD_BENCH_THREADS", torch.get_num_threads())))
    return dataclasses.asdict(bench_one(variant, method, batch_size, warmup=warmup, steps=steps, work_dir=work_dir))


def cmd_speed(args) -> dict:
    """Step time and peak RSS of each method, live teacher vs cache, rounds interleaved.

    Measured as `dwakd.evaluation.efficiency.bench_one` does (median optimizer-step time after warm-up, process RSS
    sampled every 10 ms), each measurement in a fresh spawned process: RSS does not fall back when a run frees its
    tensors, so measurements sharing a process would inherit the previous one's peak.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import yaml

    from dwakd.config import apply_overrides, config_from_dict

    tree = apply_overrides(yaml.safe_load(Path(args.config).read_text()), [*args.overrides, "data.eval=null"])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dwakd-tcache-speed-"))
    examples = args.build_examples or args.batch_size * (args.warmup + args.steps)
    cache_dir = work / "cache"
    config = config_from_dict(apply_overrides(copy.deepcopy(tree), [f"data.max_train_examples={examples}",
                                                                    f"training.output_dir={work / 'build'}"]))
    started = time.perf_counter()
    manifest = build_teacher_cache(config, cache_dir, CacheSettings(k=args.k, tail_rank=args.tail_rank),
                                   show_progress=False)
    build = {"seconds": round(time.perf_counter() - started, 2), "build_seconds": manifest["build_seconds"],
             "examples": manifest["examples"]["unique"], "rows": manifest["sizes"]["rows"],
             "seconds_per_1000_examples": round(1000 * manifest["build_seconds"] / manifest["examples"]["unique"], 1),
             "load_average": os.getloadavg()[0]}
    print(json.dumps({"build": build}), flush=True)
    samples: dict = {}
    context = multiprocessing.get_context("spawn")
    os.environ["DWAKD_BENCH_THREADS"] = str(torch.get_num_threads())
    for round_index in range(args.rounds):
        for method in args.methods:
            modes = ("live", "cache") if round_index % 2 == 0 else ("cache", "live")  # neither always runs first
            for mode in modes:
                variant = copy.deepcopy(tree)
                if mode == "cache":
                    variant["teacher"]["cache"] = str(cache_dir)
                with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    result = pool.submit(_bench_in_child, variant, method, args.batch_size, args.warmup, args.steps,
                                         str(work / f"{method}-{mode}-{round_index}")).result()
                if result["error"]:
                    raise RuntimeError(f"{method} {mode}: {result['error']}")
                entry = samples.setdefault(f"{method}/{mode}", {"median_step_s": [], "peak_rss_gib": [],
                                                                 "step_seconds": [], "load": []})
                entry["median_step_s"].append(result["median_step_s"])
                entry["peak_rss_gib"].append(result["peak_mem_gib"])
                entry["step_seconds"].append(result["step_seconds"])
                entry["load"].append(os.getloadavg()[0])
                print(json.dumps({"round": round_index, "method": method, "mode": mode,
                                  "median_step_s": result["median_step_s"], "peak_rss_gib": result["peak_mem_gib"]}),
                      flush=True)
    summary = {key: {"median_step_s": statistics.median(v["median_step_s"]), "best_step_s": min(v["median_step_s"]),
                     "peak_rss_gib": statistics.median(v["peak_rss_gib"])} for key, v in samples.items()}
    ratios = {method: {"step_time_cache_over_live": round(summary[f"{method}/cache"]["median_step_s"]
                                                          / summary[f"{method}/live"]["median_step_s"], 3),
                       "peak_rss_cache_over_live": round(summary[f"{method}/cache"]["peak_rss_gib"]
                                                         / summary[f"{method}/live"]["peak_rss_gib"], 3)}
              for method in args.methods}
    print(json.dumps({"ratios": ratios}), flush=True)
    return {"config": args.config, "overrides": args.overrides, "batch_size": args.batch_size, "k": args.k,
            "tail_rank": manifest["settings"].get("tail_rank", 0),
            "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "build": build, "samples": samples,
            "summary": summary, "ratios": ratios, "environment": environment(), "command": " ".join(sys.argv)}


def cmd_materialise(args) -> dict:
    """Seconds per `topk_to_logits` call for one batch of rows: flat tail vs rank-R tails (the addmm of the coefficients
    on the basis included), interleaved rounds, medians; random rows, no model."""
    from dwakd.teacher_cache import topk_to_logits

    torch.manual_seed(0)
    z = torch.randn(args.rows, args.vocab) * 3
    logp, ids = torch.log_softmax(z, -1).topk(args.k, -1)
    log_tail = torch.full((args.rows,), -0.5)
    cases = {"flat": None}
    for rank in args.ranks:
        basis = torch.linalg.qr(torch.randn(args.vocab, rank)).Q.T.contiguous()
        cases[f"rank{rank}"] = (torch.randn(args.vocab), torch.randn(args.rows, rank), basis)

    def call(case):
        return topk_to_logits(logp, ids, log_tail, args.vocab, args.vocab, 2.0, case)

    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.warmup):
        for case in cases.values():
            call(case)
    for round_index in range(args.rounds):
        names = list(cases) if round_index % 2 == 0 else list(reversed(cases))
        for name in names:
            started = time.perf_counter()
            call(cases[name])
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratios = {name: round(medians[name] / medians["flat"], 3) for name in cases if name != "flat"}
    print(json.dumps({"median_ms": {k: round(1e3 * v, 3) for k, v in medians.items()}, "over_flat": ratios}))
    return {"rows": args.rows, "vocab": args.vocab, "k": args.k, "ranks": args.ranks, "rounds": args.rounds,
            "seconds": times, "median_seconds": medians, "over_flat": ratios, "environment": environment(),
            "command": " ".join(sys.argv)}


def cmd_fingerprint(args) -> dict:
    """Time SHA-256 of the config's teacher saved as safetensors: first (cold) and remembered (stat cache)."""
    from dwakd.models import load_side_model, load_side_tokenizer
    from dwakd.teacher_cache.fingerprint import file_digest

    config = load_config(args.config, args.overrides)
    tokenizer = load_side_tokenizer(config.teacher, "teacher")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dwakd-tcache-fp-"))
    started = time.perf_counter()
    model = load_side_model(config.teacher, tokenizer, "teacher")
    model.save_pretrained(work / "teacher")
    del model
    saved = time.perf_counter() - started
    files = sorted((work / "teacher").glob("*.safetensors"))
    size = sum(p.stat().st_size for p in files)
    os.environ.setdefault("DWAKD_CACHE", str(work / "dwakd-cache"))
    timings = {}
    for label in ("first", "remembered"):
        started = time.perf_counter()
        for path in files:
            file_digest(path)
        timings[label] = time.perf_counter() - started
    started = time.perf_counter()
    for path in files:  # raw read speed of the same bytes (page cache warm), for scale
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
    read_only = time.perf_counter() - started
    started = time.perf_counter()
    for path in files:
        digest = hashlib.blake2b()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    blake = time.perf_counter() - started
    return {"config": args.config, "bytes": size, "save_seconds": saved, "sha256_first_seconds": timings["first"],
            "sha256_remembered_seconds": timings["remembered"], "read_only_seconds": read_only,
            "blake2b_seconds": blake, "environment": environment()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("accuracy", "speed", "materialise", "fingerprint"):
        p = sub.add_parser(name)
        if name != "materialise":
            p.add_argument("config")
            p.add_argument("overrides", nargs="*")
        p.add_argument("--out")
        p.add_argument("--work-dir")
        if name == "materialise":
            p.add_argument("--rows", type=int, default=256)
            p.add_argument("--vocab", type=int, default=151646)
            p.add_argument("--k", type=int, default=64)
            p.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
            p.add_argument("--warmup", type=int, default=3)
            p.add_argument("--rounds", type=int, default=21)
        if name == "accuracy":
            p.add_argument("--examples", type=int, default=32)
            p.add_argument("--batch-size", type=int, default=4)
            p.add_argument("--student-dir", help="a trained dskd student dir; dwakd's is its sibling named with dwakd "
                                                  "for dskd (students/dskd-seed0 -> students/dwakd-seed0)")
            p.add_argument("--fit-examples", type=int, default=0,
                           help="examples before the measured ones (built into the caches, not measured): where a "
                                "rank-R tail's basis is fitted")
            p.add_argument("--variant", action="append", type=_parse_variant, metavar="K,BITS,DTYPE,RANK",
                           help="measure this cache variant (repeatable; default: the VARIANTS list), e.g. "
                                "64,13,float16,44 or head,13,int8,0")
            p.add_argument("--modes", nargs="+", choices=["topk", "rank", "head"], default=["topk", "rank", "head"],
                           help="which cache variants to measure (top-k with a flat tail, top-k with a rank-R tail, "
                                "head mode)")
        if name == "speed":
            p.add_argument("--methods", nargs="+", default=["dskd", "dwakd"])
            p.add_argument("--batch-size", type=int, default=4)
            p.add_argument("--warmup", type=int, default=2)
            p.add_argument("--steps", type=int, default=5)
            p.add_argument("--rounds", type=int, default=3)
            p.add_argument("--k", type=lambda text: text if text == "head" else int(text), default=64,
                           help="the cache's top-k, or 'head' for a head-mode cache")
            p.add_argument("--tail-rank", type=int, default=None,
                           help="a top-k cache's tail rank (default: the builder's, 32; 0: flat)")
            p.add_argument("--build-examples", type=int, default=None,
                           help="examples the cache is built over (default: the ones the steps read)")
    args = parser.parse_args()
    commands = {"accuracy": cmd_accuracy, "speed": cmd_speed, "materialise": cmd_materialise,
                "fingerprint": cmd_fingerprint}
    result = commands[args.command](args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text[-3000:])


if __name__ == "__main__":
    main()
