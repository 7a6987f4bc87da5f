"""Teacher and student models: Hugging Face Auto* loading, PEFT/LoRA, freezing, tiny random-init builders."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from dwakd.tokenizers import load_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


@dataclass
class LoraSpec:
    """LoRA options (PEFT); `target_modules=None` lets PEFT pick the architecture's defaults."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str | None = None


@dataclass
class ModelSpec:
    """How to build one side: a hub name/local path, or a tiny random-init architecture for tests and the demo."""

    name_or_path: str | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    tiny: dict[str, Any] | None = None  # {"arch": "gpt2", "hidden_size": 64, ...}: random init, no download
    dtype: str = "float32"
    attn_implementation: str | None = None  # "eager", "sdpa", "flash_attention_2"
    trust_remote_code: bool = False
    lora: LoraSpec | None = None  # student: train LoRA adapters instead of all weights
    adapter: str | None = None  # teacher: a LoRA adapter on top of the base (merged after loading)
    cache: str | None = None  # teacher: a `dwakd teacher-cache` directory; the teacher's blocks are then never built
    seed: int = 0  # initialisation seed of tiny models


# Tiny configs per architecture: the keys every builder accepts, mapped to each config class's names.
_TINY_DEFAULTS = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "max_positions": 512}


def tiny_config(arch: str, vocab_size: int, **sizes: Any):
    """A random-init config of a real architecture (gpt2, llama, qwen2, opt, mistral) with small sizes."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    s = {**_TINY_DEFAULTS, **sizes}
    h, n_layer, n_head = s["hidden_size"], s["num_layers"], s["num_heads"]
    ffn, pos = s["intermediate_size"], s["max_positions"]
    extra = {k: v for k, v in s.items() if k not in _TINY_DEFAULTS}
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=h, n_layer=n_layer, n_head=n_head, n_inner=ffn,
                          n_positions=pos, **extra)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=n_layer, num_attention_heads=n_head,
                         ffn_dim=ffn, max_position_embeddings=pos, word_embed_proj_dim=h, **extra)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}.get(arch)
    if cls is None:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose gpt2, llama, qwen2, opt or mistral")
    return cls(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=n_layer, num_attention_heads=n_head,
               num_key_value_heads=s.get("num_kv_heads", n_head), intermediate_size=ffn,
               max_position_embeddings=pos, tie_word_embeddings=extra.pop("tie_word_embeddings", False),
               **{k: v for k, v in extra.items() if k != "num_kv_heads"})


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0, **sizes: Any) -> PreTrainedModel:
    """Random-init causal LM of a real architecture, deterministic given `seed`."""
    config = tiny_config(arch, vocab_size, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def load_side_tokenizer(spec: ModelSpec, role: str):
    """The tokenizer of one side (cheap; loaded before any model so data errors surface first)."""
    tok_spec = spec.tokenizer or spec.name_or_path
    if tok_spec is None:
        raise ValueError(f"{role}: set {role}.tokenizer (or {role}.name_or_path)")
    try:
        return load_tokenizer(tok_spec, trust_remote_code=spec.trust_remote_code)
    except ValueError as exc:
        raise ValueError(f"{role}.tokenizer: {exc}") from exc


def load_side_model(spec: ModelSpec, tokenizer, role: str) -> PreTrainedModel:
    """The model of one side, checked against its tokenizer."""
    if spec.tiny is not None:
        tiny = dict(spec.tiny)
        arch = tiny.pop("arch", "gpt2")
        model = build_tiny_model(arch, vocab_size=len(tokenizer), seed=spec.seed, **tiny)
        if spec.dtype not in ("float32", "fp32", "auto"):
            model = model.to(_dtype(spec.dtype))
    elif spec.name_or_path is not None:
        kwargs: dict[str, Any] = {"dtype": _dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code}
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, **kwargs)
    else:
        raise ValueError(f"{role}: set {role}.name_or_path or {role}.tiny")
    check_vocab(model, tokenizer, role)
    return model


def check_vocab(model: nn.Module, tokenizer, role: str) -> None:
    """The head may have more rows than the tokenizer has tokens (normal); fewer rows is an error."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ValueError(
            f"{role}: tokenizer has {len(tokenizer)} tokens but the model's embedding has only {rows} rows; "
            f"the {role}'s tokenizer does not belong to this model (or call model.resize_token_embeddings)"
        )


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a PEFT wrapper (LoRA student), whose weights are saved and loaded as an adapter."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def apply_lora(model: PreTrainedModel, lora: LoraSpec) -> nn.Module:
    """Wrap a student in PEFT LoRA adapters (only the adapters train)."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules)
    return get_peft_model(model, config)


def freeze(model: nn.Module) -> nn.Module:
    """Teacher: eval mode, no gradients ever."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def prepare_student(model: PreTrainedModel, spec: ModelSpec) -> nn.Module:
    """Full fine-tuning as is, or LoRA adapters when `spec.lora` is set."""
    return apply_lora(model, spec.lora) if spec.lora is not None else model


def prepare_teacher(model: PreTrainedModel, spec: ModelSpec) -> nn.Module:
    """Merge an optional LoRA adapter into the teacher, then freeze it."""
    if spec.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter).merge_and_unload()
    return freeze(model)


def load_model_for_inference(path_or_name: str, *, dtype: str | None = None, device: str | None = None,
                             trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode from a full checkpoint dir, a LoRA adapter dir, or a hub name."""
    path = Path(path_or_name)
    adapter_config = path / "adapter_config.json"
    torch_dtype = _dtype(dtype) if dtype else "auto"
    if adapter_config.is_file():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        base_path = Path(base) if Path(base).is_absolute() else path / base
        base_ref = str(base_path) if base_path.exists() else base
        model = AutoModelForCausalLM.from_pretrained(base_ref, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path_or_name, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(str(path_or_name), trust_remote_code=trust_remote_code)
    if device:
        model = model.to(device)
    return model.eval(), tokenizer


CUDNN_ATTENTION_ENV = "DWAKD_CUDNN_ATTENTION"


def configure_attention_backends(uses_cuda: bool) -> bool:
    """Turn off PyTorch's cuDNN backend of scaled-dot-product attention for a CUDA run; True if it did.

    cuDNN SDPA builds an execution graph for every new input shape (~4 ms of host time per attention call on an
    H200, forward and backward), and dynamic padding gives most batches a new length: on the real-size recipe
    (`configs/bench/real-size-gpu.yaml`, GPT-2-shaped student, batch 4) an `sft` step took 0.16 s with it and
    0.05 s without, the GPU busy for ~9 ms of it (`benchmarks/README.md`). The flash and memory-efficient
    backends have no per-shape setup and stay on. `DWAKD_CUDNN_ATTENTION=1` keeps cuDNN (fixed-length batches).
    """
    if not uses_cuda or os.environ.get(CUDNN_ATTENTION_ENV, "0") not in ("", "0"):
        return False
    if torch.backends.cuda.cudnn_sdp_enabled():
        logger.info("cuDNN attention off (it rebuilds a graph per batch shape); %s=1 keeps it", CUDNN_ATTENTION_ENV)
        torch.backends.cuda.enable_cudnn_sdp(False)
    return True
