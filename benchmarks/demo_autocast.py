"""CPU seconds per training step of the demo's student and teacher shapes, fp32 vs bf16 autocast, interleaved.

On CPUs without native bf16 (no AVX-512 BF16 / AMX) bf16 autocast converts around every matmul and is slower;
this decides the demo's `bf16` default. Appends one record to --results.

    python benchmarks/demo_autocast.py --results benchmarks/results/demo_speed.json --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {  # the demo's default shapes (DemoSettings), batch and a typical padded length
        "student B16 L64": (GPT2LMHeadModel(GPT2Config(vocab_size=1500, n_embd=128, n_layer=2, n_head=4, n_inner=512,
                                                       n_positions=320, bos_token_id=0, eos_token_id=0)), 16, 1500),
        "teacher B32 L64": (LlamaForCausalLM(LlamaConfig(vocab_size=4000, hidden_size=256, num_hidden_layers=4,
                                                         num_attention_heads=4, intermediate_size=768,
                                                         max_position_embeddings=320, tie_word_embeddings=True,
                                                         bos_token_id=0, eos_token_id=0)), 32, 4000),
    }
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, (model, batch, vocab) in models.items():
            optimizer = torch.optim.AdamW(model.parameters())
            ids = torch.randint(0, vocab, (batch, 64))
            for bf16 in (False, True):
                cpu = time.process_time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                times.setdefault(f"{name} {'bf16' if bf16 else 'fp32'}", []).append(time.process_time() - cpu)
    record = {"benchmark": "demo_autocast", "threads": args.threads, "rounds": args.rounds,
              "load_average": os.getloadavg()[0], "torch": torch.__version__, "cpu_flags": _cpu_flags(),
              "cpu_ms_per_step": {k: {"median": round(1000 * statistics.median(v), 1),
                                      "best": round(1000 * min(v), 1)} for k, v in times.items()}}
    print(json.dumps(record, indent=1))
    path = Path(args.results)
    records = json.loads(path.read_text()) if path.is_file() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([*records, record], indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
