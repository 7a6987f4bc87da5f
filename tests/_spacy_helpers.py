"""A small real spaCy pipeline (POS + dependency parser) trained offline in seconds, for MTA's tests.

MTA's chunker is spaCy's English pipeline, an optional download. The tests must run without it, so this trains a
blank English pipeline's morphologizer (POS) and parser on a handful of hand-annotated sentences and saves it to a
folder that `method.options.spacy_pipeline` can name. It is a genuine spaCy pipeline (the same `nlp.pipe`,
`noun_chunks` and Matcher code paths as en_core_web_sm), only a poor parser of text it has not seen.
"""

from __future__ import annotations

from pathlib import Path


def method_extra(method: str, request) -> list[str]:
    """Per-method config overrides for tests: MTA's chunker is the small pipeline of the `spacy_pipeline_dir` fixture
    (tests/conftest.py; no download needed)."""
    if method == "mta":
        return [f"method.options.spacy_pipeline={request.getfixturevalue('spacy_pipeline_dir')}"]
    return []

# (words, POS tags, heads (index of each word's head), dependency labels)
SENTENCES = [
    (["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "."],
     ["DET", "ADJ", "ADJ", "NOUN", "VERB", "ADP", "DET", "ADJ", "NOUN", "PUNCT"], [3, 3, 3, 4, 4, 4, 8, 8, 5, 4],
     ["det", "amod", "amod", "nsubj", "ROOT", "prep", "det", "amod", "pobj", "punct"]),
    (["She", "has", "been", "quickly", "reading", "long", "books", "."],
     ["PRON", "AUX", "AUX", "ADV", "VERB", "ADJ", "NOUN", "PUNCT"], [4, 4, 4, 4, 4, 6, 4, 4],
     ["nsubj", "aux", "aux", "advmod", "ROOT", "amod", "dobj", "punct"]),
    (["A", "student", "learns", "the", "answer", "."],
     ["DET", "NOUN", "VERB", "DET", "NOUN", "PUNCT"], [1, 2, 2, 4, 2, 2],
     ["det", "nsubj", "ROOT", "det", "dobj", "punct"]),
    (["Teachers", "write", "short", "answers", "for", "the", "students", "."],
     ["NOUN", "VERB", "ADJ", "NOUN", "ADP", "DET", "NOUN", "PUNCT"], [1, 1, 3, 1, 1, 6, 4, 1],
     ["nsubj", "ROOT", "amod", "dobj", "prep", "det", "pobj", "punct"]),
    (["The", "model", "predicts", "the", "next", "token", "."],
     ["DET", "NOUN", "VERB", "DET", "ADJ", "NOUN", "PUNCT"], [1, 2, 2, 5, 5, 2, 2],
     ["det", "nsubj", "ROOT", "det", "amod", "dobj", "punct"]),
    (["Distillation", "moves", "knowledge", "from", "a", "large", "teacher", "to", "a", "small", "student", "."],
     ["NOUN", "VERB", "NOUN", "ADP", "DET", "ADJ", "NOUN", "ADP", "DET", "ADJ", "NOUN", "PUNCT"],
     [1, 1, 1, 1, 6, 6, 3, 1, 10, 10, 7, 1],
     ["nsubj", "ROOT", "dobj", "prep", "det", "amod", "pobj", "prep", "det", "amod", "pobj", "punct"]),
]


def train_tiny_pipeline(path: Path, iterations: int = 40) -> Path:
    """Train and save the pipeline to `path` (deterministic: fixed seed, one thread)."""
    import spacy
    from spacy.tokens import Doc
    from spacy.training import Example
    from spacy.util import fix_random_seed

    fix_random_seed(0)
    nlp = spacy.blank("en")
    small = {"@architectures": "spacy.HashEmbedCNN.v2", "pretrained_vectors": None, "width": 32, "depth": 2,
             "embed_size": 500, "window_size": 1, "maxout_pieces": 2, "subword_features": True}
    morphologizer = nlp.add_pipe("morphologizer", config={"model": {"tok2vec": small}})
    parser = nlp.add_pipe("parser", config={"model": {"tok2vec": small, "hidden_width": 32}})
    examples = []
    for words, pos, heads, deps in SENTENCES:
        doc = Doc(nlp.vocab, words=words)
        examples.append(Example.from_dict(doc, {"pos": pos, "heads": heads, "deps": deps}))
        for tag in pos:
            morphologizer.add_label(f"POS={tag}")
        for dep in deps:
            parser.add_label(dep)
    optimizer = nlp.initialize(lambda: examples)
    for _ in range(iterations):
        nlp.update(examples, sgd=optimizer, losses={})
    nlp.to_disk(path)
    return path
