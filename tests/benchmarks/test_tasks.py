"""RULER-style task generator (benchmarks/ruler/tasks.py): lengths, determinism, references, scoring.

qa_1 runs on a small disfl_qa-format file written here (SQuAD-like paragraphs built from the essays),
so no test needs the fetched BIG-bench data; the one test of the real file skips without it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import time

import pytest

from benchmarks.ruler import qa
from benchmarks.ruler.common import TOLERANCE, Sample, prompt_tokens, sample_seed
from benchmarks.ruler.prose import _SENTENCE_END, essay_sentences, fill, insert
from benchmarks.ruler.tasks import HAYSTACK_TASKS, TASKS, generate_task, score_output

RETRIEVAL = [t for t in TASKS if t.startswith("niah") or t in ("vt", "qa_1")]


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's real tokenizer; the model itself is not needed here (nor loaded)."""
    from zigzag.testing.models import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def synthetic_qa_root(tmp_path_factory):
    """A ZIGZAG_CACHE folder holding a disfl_qa-format task file of 80 made-up questions.

    Written word-tokenized like the real file ("Person 7 ' s", " , "), with one unanswerable example.
    """
    root = tmp_path_factory.mktemp("zigzag_cache")
    sentences = essay_sentences()
    examples = []
    for k in range(80):
        body = " ".join(sentences[300 + 7 * k : 306 + 7 * k]).replace(",", " ,").replace("'", " ' ")
        fact = f"The harbour of Port Vel{k} , in Rhen{k} ' s county , was built by Oda Marrow{k} ."
        examples.append(
            {
                "input": f"Who built the port no sorry the harbour of Port Vel{k} ?  \ncontext: {body} {fact}",
                "target": f"Oda Marrow{k}",
            }
        )
    examples.append({"input": "Who built Rome ?  \ncontext: Rome was not built in a day .", "target": "unknown"})
    path = root / "data" / "bigbench-1.0.0" / "disfl_qa" / "task.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": "disfl_qa", "examples": examples}))
    return root


@pytest.fixture
def data(request, monkeypatch, synthetic_qa_root):
    """Point qa_1 at the synthetic file (other tasks ignore it)."""
    monkeypatch.setenv("ZIGZAG_CACHE", str(synthetic_qa_root))


def test_task_list():
    assert TASKS == (
        "niah_single_1",
        "niah_single_2",
        "niah_single_3",
        "niah_multikey_1",
        "niah_multikey_2",
        "niah_multikey_3",
        "niah_multivalue",
        "niah_multiquery",
        "vt",
        "cwe",
        "fwe",
        "qa_1",
    )


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("task", TASKS)
def test_length_within_tolerance(task, length, tok, data):
    samples = generate_task(task, tok, length, 4, seed=0)
    lengths = [prompt_tokens(s, tok) for s in samples]
    assert all(abs(n - length) <= TOLERANCE * length for n in lengths), lengths
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert all(s.task == task and s.metric == ("any" if task == "qa_1" else "all") for s in samples)
    # The separators belong to user_message and the chat template, not to the parts.
    assert all(p == p.strip() for s in samples for p in (s.context, s.question, s.answer_prefix))


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_distinct_and_seeded(task, tok, data):
    a = generate_task(task, tok, 1024, 3, seed=0)
    assert a == generate_task(task, tok, 1024, 3, seed=0)
    # Samples of a task differ from each other, and another seed gives other samples.
    assert len({s.context for s in a}) == 3
    assert len({s.references for s in a}) == 3
    b = generate_task(task, tok, 1024, 3, seed=1000)
    assert all(x.context != y.context and x.references != y.references for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("task", RETRIEVAL)
def test_references_in_context(task, tok, data):
    for sample in generate_task(task, tok, 2048, 3, seed=0):
        assert sample.references
        for ref in sample.references:
            assert ref in sample.context
            assert ref not in sample.question + sample.answer_prefix


def test_needle_depths_spread_evenly(tok):
    samples = generate_task("niah_single_2", tok, 2048, 5, seed=0)
    where = [s.context.index(s.references[0]) / len(s.context) for s in samples]
    assert where == sorted(where)
    assert where[0] < 0.15 and where[-1] > 0.9


@pytest.mark.parametrize("task", ["niah_multikey_1", "niah_multikey_2", "niah_multikey_3"])
def test_multikey_distractors(task, tok):
    for sample in generate_task(task, tok, 2048, 2, seed=0):
        keys = re.findall(r"One of the special magic \w+ for (\S+) is:", sample.context)
        assert len(keys) == len(set(keys)) >= (4 if task == "niah_multikey_1" else 10)
        asked = [k for k in keys if k in sample.question]
        assert len(asked) == 1


def test_multivalue_and_multiquery(tok):
    (mv,) = generate_task("niah_multivalue", tok, 2048, 1, seed=0)
    key = re.search(r"numbers for (\S+) mentioned", mv.question).group(1)
    assert re.findall(rf"for {key} is: (\d+)\.", mv.context) == sorted(mv.references, key=mv.context.index)
    assert len(set(mv.references)) == 4
    (mq,) = generate_task("niah_multiquery", tok, 2048, 1, seed=0)
    keys = re.findall(r"for (\S+) is:", mq.context)
    assert len(keys) == 4 and all(k in mq.question for k in keys)


def test_vt_chain(tok):
    for sample in generate_task("vt", tok, 2048, 3, seed=0):
        value = re.search(r"assigned the value (\d+) in", sample.question).group(1)
        assignments = re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", sample.context)
        assert assignments[0] == (sample.references[0], value)
        assert [rhs for _, rhs in assignments[1:]] == [f"VAR {v}" for v in sample.references[:-1]]
        assert [lhs for lhs, _ in assignments] == list(sample.references)


def test_cwe_common_words_dominate(tok):
    for sample in generate_task("cwe", tok, 4096, 2, seed=0):
        words = re.findall(r"\d+\. (\w+)", sample.context)
        counts = collections.Counter(words)
        common = set(sample.references)
        assert len(common) == 10
        assert min(counts[w] for w in common) >= 3 * max(c for w, c in counts.items() if w not in common)
        # No answer word hides inside another listed word (string matching would credit it).
        assert not any(c in w for c in common for w in counts if w != c)


def test_fwe_top_three(tok):
    for sample in generate_task("fwe", tok, 4096, 2, seed=0):
        text = sample.context.split("coded words. ", 1)[1]
        ranked = collections.Counter(text.split(" .... ")).most_common(4)
        assert tuple(w for w, _ in ranked[:3]) == sample.references
        assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]


def test_generation_is_fast(tok, data):
    generate_task("niah_single_2", tok, 4096, 1, seed=0)  # tokenizes the essays once
    start = time.perf_counter()
    for task in TASKS:
        generate_task(task, tok, 4096, 2, seed=7)
    assert (time.perf_counter() - start) / (2 * len(TASKS)) < 0.5


# sha256 of the samples (3 at 1024 tokens, seed 0, SmolLM2) as generated before haystack families
# existed: the default haystacks must keep giving byte-identical prompts. qa_1 is left out (its data
# here is the synthetic file); no haystack code touches it.
_DEFAULT_DIGESTS = {
    "niah_single_1": "63903db05471cd95e72ba139acfc7ae742f09221705dfa5ad49bdf61c044ffd4",
    "niah_single_2": "1e5fe56a33e9ea151f87c8978014f97d592ace204932ad57904c9e9f2c650337",
    "niah_single_3": "2925c049fbe58a7a70b3ec56fc0b17f243a029beca159dc7965bc13719c22b69",
    "niah_multikey_1": "99b8a43f91c17c204583e090b15f748021b08e0b37ea89e20c2621d2123760f3",
    "niah_multikey_2": "f1051a913de9b84c89aaf955d46ec1065dfc2bf6b7faf73586a1f276a0d4a586",
    "niah_multikey_3": "18ad5c69f5e1bbf567364c4f59a00792d4a1ad76ff0cdf3c44f4ad09719ca64c",
    "niah_multivalue": "cbe3eb114228a907fc37ff07c1f521f7e70aa4f9ad1a6e13092af77d7a1e8e98",
    "niah_multiquery": "cf99e4c50a32f987a05ac462e0b86749dbed5678b9dc69c2071f8b8e774f0c1d",
    "vt": "5a31d8eb6cd43e4b30c1909c618d247d7d2a248f01979b1d1a62b0dec49e83fa",
    "cwe": "ad2693fd113800bff159e913ba113ab9f5f9d665689112d46f42a52b33f05b94",
    "fwe": "2456212878aac73597ee9e179f5b5a2b7cae521222926986c368ad4c92cfe549",
}


def _digest(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        fields = [s.task, s.index, s.context, s.question, s.answer_prefix, list(s.references), s.metric]
        h.update(json.dumps(fields).encode())
    return h.hexdigest()


@pytest.mark.parametrize("task", sorted(_DEFAULT_DIGESTS))
def test_default_haystacks_unchanged(task, tok):
    samples = generate_task(task, tok, 1024, 3, seed=0)
    assert _digest(samples) == _DEFAULT_DIGESTS[task]
    assert all(s.haystack is None for s in samples)
    assert generate_task(task, tok, 1024, 3, seed=0, haystack=None) == samples


@pytest.mark.parametrize("task", [t for t in TASKS if t not in HAYSTACK_TASKS and t != "qa_1"])
def test_family_leaves_tasks_without_filler_alone(task, tok):
    """Needle haystacks (multikey_2/3) and the word lists of cwe/fwe stay as they are, seed included."""
    for family in ("essays", "noise"):
        assert _digest(generate_task(task, tok, 1024, 3, seed=0, haystack=family)) == _DEFAULT_DIGESTS[task]


def test_family_is_in_the_seed():
    assert sample_seed("vt", 0, 1024, 2) == "ruler/vt/0/1024/2"  # unchanged without a family
    seeds = {sample_seed("vt", 0, 1024, 2, f) for f in (None, "essays", "novels", "manuals", "noise")}
    assert len(seeds) == 5


@pytest.mark.parametrize("family", ["essays", "noise"])
def test_family_on_its_default_task_still_draws_anew(family, tok):
    """Asking for a task's own filler by name gives other draws than the default (the seed differs)."""
    task = "niah_single_2" if family == "essays" else "niah_single_1"
    a, b = generate_task(task, tok, 1024, 2, seed=0), generate_task(task, tok, 1024, 2, seed=0, haystack=family)
    assert all(x.references != y.references for x, y in zip(a, b, strict=True))
    assert [s.haystack for s in b] == [family, family]


def test_sentence_split_keeps_every_character():
    text = 'He said "hi." Then (it was.) So? Yes! 3.5 is fine.'
    assert _SENTENCE_END.split(text) == ['He said "hi."', "Then (it was.)", "So?", "Yes!", "3.5 is fine."]
    assert " ".join(essay_sentences()).count("special magic") == 0  # needles never come from the prose


def test_insert_keeps_order_at_equal_depths():
    units = ["a.", "b.", "c.", "d."]
    assert insert(units, [(0.5, "X1"), (0.0, "S"), (0.5, "X2"), (1.0, "E")]) == "S a. b. X1 X2 c. d. E"


def test_fill_lands_on_budget(tok):
    sentences = essay_sentences()
    for budget in (1, 57, 500):
        text = " ".join(fill(tok, "essays", sentences, 10, budget, partial=True))
        assert budget - 3 <= len(tok(" " + text, add_special_tokens=False)["input_ids"]) <= budget


def _sample(refs: tuple[str, ...], metric: str) -> Sample:
    return Sample("t", 0, "context", "question", "Answer:", refs, metric)


def test_score_output_all_gives_partial_credit():
    sample = _sample(("1234567", "ABCDE", "7654321", "apple"), "all")
    assert score_output(sample, "1234567, abcde, 7654321 and APPLE.") == 100.0
    assert score_output(sample, "The numbers are 1234567 and Abcde.") == 50.0
    assert score_output(sample, "I do not know.") == 0.0
    assert score_output(_sample(("42",), "all"), " 42.") == 100.0


def test_score_output_any_takes_the_best():
    sample = _sample(("Oda Marrow", "Marrow"), "any")
    assert score_output(sample, "It was built by oda marrow.") == 100.0
    assert score_output(sample, "Mr. Marrow") == 100.0
    assert score_output(sample, "Nobody") == 0.0


def test_score_output_rejects_unknown_metric():
    with pytest.raises(ValueError, match="metric"):
        score_output(_sample(("a",), "most"), "a")


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="task must be one of"):
        generate_task("niah_single_9", tok, 1024, 1, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        generate_task("vt", tok, 1024, 0, seed=0)
    with pytest.raises(ValueError, match="context_tokens"):
        generate_task("vt", tok, 16, 1, seed=0)
    with pytest.raises(ValueError, match="too short"):
        generate_task("niah_multikey_3", tok, 100, 1, seed=0)


def test_qa_needs_fetched_data(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("ZIGZAG_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(qa.FETCH_COMMAND)):
        generate_task("qa_1", tok, 1024, 1, seed=0)


def test_qa_loader_detokenizes_and_drops_unanswerable(data):
    items, paragraphs = qa.load_disfl_qa(qa.disfl_qa_path())
    assert len(items) == 80 and len(paragraphs) == 81
    assert items[3].answer == "Oda Marrow3"
    assert items[3].question == "Who built the port no sorry the harbour of Port Vel3?"
    assert paragraphs[items[3].paragraph].endswith(
        "The harbour of Port Vel3, in Rhen3's county, was built by Oda Marrow3."
    )


def test_detokenize():
    assert qa.detokenize("the Earth ' s atmosphere ( see Occurrence ) .") == "the Earth's atmosphere (see Occurrence)."
    assert (
        qa.detokenize('a fault - tolerant , " efficient " method , 1 , 300 ft')
        == 'a fault-tolerant, "efficient" method, 1,300 ft'
    )


def test_real_disfl_qa():
    path = qa.disfl_qa_path()
    if not path.is_file():
        pytest.skip(f"BIG-bench disfl_qa not fetched (`{qa.FETCH_COMMAND}`)")
    items, paragraphs = qa.load_disfl_qa(path)
    assert len(items) > 5000 and len(paragraphs) > 1000
    assert all(item.answer in paragraphs[item.paragraph] for item in items)
