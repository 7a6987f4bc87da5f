"""Shared fixtures: real vocabularies (Qwen, GPT-2) and tiny random-init models; CUDA tests skip without CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from dwakd.tokenizers import load_tokenizer

    return load_tokenizer("builtin:qwen")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from dwakd.tokenizers import load_tokenizer

    return load_tokenizer("builtin:gpt2")


@pytest.fixture
def tiny_yaml(tmp_path) -> Path:
    """configs/tiny-cpu.yaml with the data path made absolute and output under tmp_path."""
    import yaml

    tree = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    tree["data"]["train"] = str(REPO / tree["data"]["train"])
    tree["data"]["eval"] = str(REPO / tree["data"]["eval"])
    tree["training"]["output_dir"] = str(tmp_path / "run")
    tree["training"]["disable_tqdm"] = True
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="session")
def spacy_pipeline_dir(tmp_path_factory) -> Path:
    """A small real spaCy pipeline (tagger + parser) trained offline, for MTA's chunker (skips without spaCy)."""
    pytest.importorskip("spacy")
    from _spacy_helpers import train_tiny_pipeline

    return train_tiny_pipeline(tmp_path_factory.mktemp("spacy") / "tiny_en")
