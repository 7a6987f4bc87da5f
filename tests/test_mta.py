"""MTA: word/phrase units (spaCy, at tokenization time, both sides by offsets), the trajectory loss against a naive
float64 reference on models of unequal depth, equality with DSKD-CMA at weight 0, and a missing chunker failing
before any data is read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _baseline_helpers import EXAMPLES, MORE_EXAMPLES
from _kd_helpers import one_thread
from _repr_helpers import (
    ModelPair,
    deep_model,
    naive_centre,
    naive_self_similarity,
    naive_structure,
    naive_weighted_distance,
    run_both,
    trainable,
)
from _spacy_helpers import SENTENCES

from dwakd.data import DistillationCollator, InstructionRecord, encode_records
from dwakd.data.units import UnitsUnavailableError, token_unit_ids
from dwakd.methods import MethodContext, build_method
from dwakd.methods.base import OptionError

spacy = pytest.importorskip("spacy")
# after importorskip on purpose: without spaCy the module is skipped before its phrase code is imported
from dwakd.data.phrases import SpacyPhraseAnnotator, load_pipeline, phrase_matcher, phrases_and_words  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL_EXAMPLES = EXAMPLES + MORE_EXAMPLES


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


# ------------------------------------------------------------------------------------------------ units


def annotated_doc():
    """A parsed sentence written by hand (POS, heads, labels), so noun chunks and verb phrases are known exactly."""
    from spacy.tokens import Doc

    words = ["She", "has", "been", "quickly", "reading", "the", "long", "books", "and", "the", "dog", "barks", "."]
    spaces = [True] * (len(words) - 2) + [False, False]
    pos = ["PRON", "AUX", "AUX", "ADV", "VERB", "DET", "ADJ", "NOUN", "CCONJ", "DET", "NOUN", "VERB", "PUNCT"]
    heads = [4, 4, 4, 4, 4, 7, 7, 4, 4, 10, 11, 4, 4]
    deps = ["nsubj", "aux", "aux", "advmod", "ROOT", "det", "amod", "dobj", "cc", "det", "nsubj", "conj", "punct"]
    return Doc(spacy.blank("en").vocab, words=words, spaces=spaces, pos=pos, heads=heads, deps=deps)


def test_phrases_and_words_from_a_parsed_sentence() -> None:
    doc = annotated_doc()
    text = doc.text
    phrases, words = phrases_and_words(doc, phrase_matcher(spacy.blank("en")))
    assert [text[a:b] for a, b in phrases] == ["She", "has been quickly reading", "the long books", "the dog", "barks"]
    assert [text[a:b] for a, b in words] == ["She", "has", "been", "quickly", "reading", "the", "long", "books",
                                             "the", "dog", "barks"]


def test_overlapping_candidates_keep_the_earliest_longest() -> None:
    """Candidates sorted by start, longest first; a candidate overlapping a kept phrase is dropped (nested or not)."""
    doc = annotated_doc()

    def matcher(_doc):  # tokens 1–4 "has been quickly reading", 3–6 overlaps it, 5–6 "the long" nested in a chunk
        return [(0, 3, 6), (0, 1, 5), (0, 5, 7)]

    phrases, _ = phrases_and_words(doc, matcher)
    text = doc.text
    assert [text[a:b] for a, b in phrases] == ["She", "has been quickly reading", "the long books", "the dog"]


def test_annotator_scopes_and_offsets(spacy_pipeline_dir) -> None:
    prompts = ["### Instruction:\nThe model predicts the next token.\n\n### Response:\n"] * 2
    responses = [" ".join(SENTENCES[0][0][:-1]) + ".", " ".join(SENTENCES[2][0][:-1]) + "."]
    response_only = SpacyPhraseAnnotator(str(spacy_pipeline_dir), "response").annotate(prompts, responses)
    everything = SpacyPhraseAnnotator(str(spacy_pipeline_dir), "all").annotate(prompts, responses)
    for k, (prompt, response) in enumerate(zip(prompts, responses)):
        text = prompt + response
        assert response_only[k]["phrase"] and all(a >= len(prompt) for a, _ in response_only[k]["phrase"])
        in_prompt = [u for u in everything[k]["phrase"] if u[1] <= len(prompt)]
        assert in_prompt and [u for u in everything[k]["phrase"] if u[0] >= len(prompt)] == response_only[k]["phrase"]
        for kind in ("word", "phrase"):
            units = everything[k][kind]
            assert units == sorted(units) and all(a < b <= c for (a, b), (c, _) in zip(units, units[1:]))
            assert all(text[a:b].strip() == text[a:b] and text[a:b] for a, b in units)
    assert [responses[0][a - len(prompts[0]):b - len(prompts[0])] for a, b in response_only[0]["phrase"]][:2] == \
        ["The quick brown fox", "jumps"]


def test_units_are_carried_from_tokenization_to_the_batch(spacy_pipeline_dir, gpt2_tokenizer, qwen_tokenizer) -> None:
    """encode_records stores each unit's tokens on both sides; the collator pads with −1; the trainer's view has them;
    the tokens of unit k on either side lie inside unit k's text."""
    from dwakd.trainer import _token_view

    records = [InstructionRecord(p, (r,)) for p, r in ALL_EXAMPLES[:3]] + [
        InstructionRecord("### Instruction:\nDescribe.\n\n### Response:\n", (" ".join(SENTENCES[1][0][:-1]) + ".",))]
    annotator = SpacyPhraseAnnotator(str(spacy_pipeline_dir), "response")
    found = annotator.annotate([r.prompt for r in records], [r.response for r in records])
    examples, _ = encode_records(records, gpt2_tokenizer, qwen_tokenizer, show_progress=False, annotator=annotator)
    batch = DistillationCollator(gpt2_tokenizer.pad_token_id, qwen_tokenizer.pad_token_id)(examples)
    student, teacher = _token_view(batch, ""), _token_view(batch, "teacher_")
    assert set(student.units) == set(teacher.units) == {"word", "phrase"}
    for view, prefix in ((student, ""), (teacher, "teacher_")):
        for kind in ("word", "phrase"):
            ids = view.units[kind]
            assert ids.shape == view.input_ids.shape and torch.equal(ids, batch[f"{prefix}units_{kind}"])
            assert torch.all(ids[view.attention_mask == 0] == -1)
            for b, record in enumerate(records):
                text = record.prompt + record.response
                for i in range(ids.shape[1]):
                    k = int(ids[b, i])
                    if k >= 0:
                        start, end = found[b][kind][k]
                        s, e = view.input_offsets[b, i].tolist()
                        assert start <= s + (len(text[s:e]) - len(text[s:e].lstrip())) and e <= end
                seen = {int(v) for v in ids[b] if v >= 0}
                assert seen <= set(range(len(found[b][kind])))
    assert any(int(v) >= 0 for v in student.units["phrase"][3])  # the parsed sentence has phrases on both sides
    assert any(int(v) >= 0 for v in teacher.units["phrase"][3])


def test_missing_chunker_fails_before_any_data_is_read(tiny_yaml, tmp_path, monkeypatch, capsys) -> None:
    import dwakd.run
    from dwakd.cli import main
    from dwakd.config import load_config

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the chunker was checked")

    monkeypatch.setattr(dwakd.run, "load_datasets", no_data)
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` raises ImportError
    config = load_config(tiny_yaml, ["method=mta", f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(UnitsUnavailableError, match=r"pip install 'dwakd\[mta\]'"):
        dwakd.run.build_training(config, show_progress=False)
    assert main(["train", str(tiny_yaml), "method=mta", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "dwakd[mta]" in capsys.readouterr().err
    monkeypatch.delitem(sys.modules, "spacy")
    with pytest.raises(UnitsUnavailableError, match="no_such_pipeline"):
        load_pipeline("no_such_pipeline")


def test_real_english_pipeline_if_installed() -> None:
    try:
        nlp = load_pipeline("auto")
    except UnitsUnavailableError:
        pytest.skip("no spaCy English pipeline installed (pip install 'dwakd[mta]')")
    doc = nlp("The quick brown fox jumps over the lazy dog. She has been quickly reading long books.")
    phrases, _ = phrases_and_words(doc, phrase_matcher(nlp))
    got = [doc.text[a:b] for a, b in phrases]
    assert got == ["The quick brown fox", "jumps", "the lazy dog", "She", "has been quickly reading", "long books"]


# ------------------------------------------------------------------------------------------------ the loss


class Pair(ModelPair):
    """Two real small tokenizers, GPT-2 2 layers ↔ Qwen2 3 layers (`ModelPair`), with word units (each whitespace word
    of the answer) and phrase units (two consecutive words) on both sides."""

    def __init__(self):
        super().__init__(ALL_EXAMPLES)
        for view in (self.s_view, self.t_view):
            view.units = {kind: self.unit_ids(view, kind) for kind in ("word", "phrase")}

    @staticmethod
    def units(prompt: str, response: str, kind: str) -> list[tuple[int, int]]:
        words, start = [], len(prompt)
        for word in response.split(" "):
            words.append((start, start + len(word)))
            start += len(word) + 1
        return words if kind == "word" else [(a[0], b[1]) for a, b in zip(words[::2], words[1::2])]

    def unit_ids(self, view, kind: str) -> torch.Tensor:
        rows = []
        for b, (prompt, response) in enumerate(ALL_EXAMPLES):
            offsets = view.input_offsets[b].tolist()
            rows.append(token_unit_ids(offsets, self.units(prompt, response, kind), prompt + response))
        return torch.tensor(rows)


@pytest.fixture(scope="module")
def pair():
    return Pair()


def build(pair: Pair, name: str = "mta", seed: int = 0, **options):
    torch.manual_seed(seed)
    return build_method(name, pair.context(), options).double()


def naive_mta(method, inputs) -> dict[str, torch.Tensor]:
    """(L_MTA, mean DSA, mean HRA) by loops over pairs, sequences, units and tokens (float64)."""
    o = method.options
    s, t = inputs.student, inputs.teacher
    n = float(inputs.num_items)
    zero = torch.zeros((), dtype=torch.float64)
    dsa_total, hra_total = zero, zero
    for k, (ls, lt) in enumerate(method.layer_pairs):
        kind = "word" if k < o.word_pairs else "phrase"
        proj = method.mta_projectors[str(k)] if str(k) in method.mta_projectors else None
        for b in range(s.input_ids.shape[0]):
            h_s = inputs.student_out.hidden_states[ls]
            h_t = inputs.teacher_out.hidden_states[lt]
            w_s = naive_self_similarity(h_s.detach(), s.attention_mask, b)
            w_t = naive_self_similarity(h_t, t.attention_mask, b)
            s_units = {int(v) for v in s.units[kind][b] if v >= 0}
            t_units = {int(v) for v in t.units[kind][b] if v >= 0}
            u_s, u_t, mass = [], [], []
            for unit in sorted(s_units & t_units):
                cs, _ = naive_centre(h_s[b], w_s, [i for i in range(h_s.shape[1]) if int(s.units[kind][b, i]) == unit])
                ct, m = naive_centre(h_t[b], w_t, [j for j in range(h_t.shape[1]) if int(t.units[kind][b, j]) == unit])
                u_s.append(cs), u_t.append(ct), mass.append(m)
            share = int(s.label_mask[b].sum()) / n

            projected = [proj.weight.double() @ v + proj.bias.double() for v in u_s] if proj is not None else None
            dsa_total = dsa_total + share * naive_structure(projected if o.dsa_projected else u_s, u_t, mass)
            if k in method.hra_pairs:
                hra_total = hra_total + share * naive_weighted_distance(projected, u_t, mass)
    pairs = len(method.layer_pairs)
    return {"mta": (dsa_total + o.hra_weight * hra_total) / pairs, "mta_dsa": dsa_total / pairs,
            "mta_hra": hra_total / pairs}


def grads(loss, params):
    values = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True, retain_graph=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params, values)}


@pytest.mark.parametrize("options", [
    {"layer_pairs": [[1, 1], [2, 3]], "word_pairs": 1},
    {"layer_pairs": [[0, 0], [1, 2], [2, 3]], "word_pairs": 2, "hra_pairs": [2], "hra_weight": 0.5},
    {"dsa_projected": True, "mta_weight": 1.5},  # default map: proportional, 2 pairs for depths 2 and 3
])
def test_trajectory_loss_and_gradients_match_reference(pair: Pair, options: dict) -> None:
    method = build(pair, **options)
    out = method(pair.inputs())
    ref = naive_mta(method, pair.inputs())
    for name in ("mta", "mta_dsa", "mta_hra"):
        assert out.parts[name].item() == pytest.approx(ref[name].item(), rel=1e-9, abs=1e-14), name
    assert out.parts["mta_dsa"].item() > 0
    assert (out.parts["mta_hra"].item() > 0) == bool(method.hra_pairs)
    weight = 0.5 * method.options.mta_weight  # inside the KD weight (kd_rate 0.5)
    params = trainable(method, pair.student)
    got = grads(out.loss, params)
    saved, method.options.mta_weight = method.options.mta_weight, 0.0
    host = method(pair.inputs())
    base = grads(host.loss, params)
    method.options.mta_weight = saved
    assert out.loss.item() - host.loss.item() == pytest.approx(weight * ref["mta"].item(), rel=1e-9)
    want = grads(weight * ref["mta"], params)
    for name, _ in params:
        torch.testing.assert_close(got[name] - base[name], want[name], rtol=1e-6, atol=1e-10, msg=name)
    assert all(want[name].abs().sum() > 0 for name, _ in params if name.startswith("method.mta_projectors"))
    assert all(p.grad is None for p in pair.teacher.parameters())


def test_weight_zero_is_dskd_exactly(pair: Pair) -> None:
    mta = build(pair, seed=4, mta_weight=0.0)
    dskd = build(pair, name="dskd", seed=4)
    a, b = mta(pair.inputs()), dskd(pair.inputs())
    assert torch.equal(a.loss, b.loss)
    for name, value in b.parts.items():
        assert torch.equal(a.parts[name], value), name


def test_default_layer_map_and_options(pair: Pair) -> None:
    method = build(pair)
    assert method.layer_pairs == [(1, 2), (2, 3)]  # proportional: round(k·2/2), round(k·3/2)
    assert sorted(method.mta_projectors) == ["0", "1"]
    assert sorted(build(pair, hra_weight=0.0).mta_projectors) == []
    for bad, option in (({"layer_pairs": [[1, 5]]}, "layer_pairs"), ({"word_pairs": 3}, "word_pairs"),
                        ({"layer_pairs": [[1, 1]], "word_pairs": 2}, "word_pairs"), ({"hra_pairs": [7]}, "hra_pairs"),
                        ({"unit_scope": "prompt"}, "unit_scope"), ({"mta_weight": -1.0}, "mta_weight"),
                        ({"spacy_pipeline": ""}, "spacy_pipeline")):
        with pytest.raises(OptionError, match=f"method.options.{option}"):
            build_method("mta", pair.context(), bad)


def test_missing_units_are_an_error(pair: Pair) -> None:
    method = build(pair)
    inputs = pair.inputs()
    saved, inputs.student.units = inputs.student.units, None
    try:
        with pytest.raises(ValueError, match="needs word and phrase units"):
            method(inputs)
    finally:
        inputs.student.units = saved


def test_bf16_autocast_and_lora_student(pair: Pair) -> None:
    from dwakd.models import LoraSpec, apply_lora

    student = apply_lora(deep_model("gpt2", len(pair.s_tok), seed=0, hidden=16, layers=2).float(),
                         LoraSpec(r=4, alpha=8, target_modules=["c_attn"]))
    teacher = pair.teacher.float()
    try:
        context = MethodContext(student.config, teacher.config, pair.s_tok, pair.t_tok, student, teacher)
        torch.manual_seed(0)
        method = build_method("mta", context)

        def run():
            return method(run_both(student, teacher, pair.s_view, pair.t_view, len(pair.s_tok), len(pair.t_tok)))

        fp32 = run()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run()
        assert torch.isfinite(out.loss) and out.parts["mta"].item() == pytest.approx(fp32.parts["mta"].item(), rel=5e-2)
        out.loss.backward()
        grads = {n for n, p in student.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.mta_projectors.parameters())
    finally:
        pair.teacher = teacher.double()
