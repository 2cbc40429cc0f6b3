"""The domain metrics of the generation eval (eval/domain_metrics.py): SQuAD normalization and
token F1 equal lm-eval's copy of the SQuAD v1.1 script; QA match, citation precision / recall
and over- / under-refusal on hand-scored answers; bad question files and patterns are errors
naming the file, line or key."""

from __future__ import annotations

import pytest

from megatron_domain.eval.domain_metrics import cited_sources, domain_metrics, normalize_answer, token_f1

PAIRS = [("The  quick, brown fox!", "quick brown fox"), ("An apple a day", "apple day"),
         ("Assert statements insert assertions.", "assert statements insert debugging assertions"),
         ("", "something"), ("the", ""), ("Tuples are immutable; lists aren't.", "lists are mutable, tuples aren't"),
         ("x = a + b", "X=A+B")]


def test_normalization_and_f1_match_the_squad_script():
    qasper = pytest.importorskip("lm_eval.tasks.qasper.metrics")  # lm-eval's copy of the SQuAD v1.1 script
    for prediction, reference in PAIRS:
        assert normalize_answer(prediction) == qasper.normalize_answer(prediction)
        if normalize_answer(prediction) and normalize_answer(reference):
            assert token_f1(prediction, reference) == pytest.approx(qasper.f1_abstractive([prediction], [reference]))
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def test_cited_sources_reads_every_citation_form():
    assert cited_sources("A. [source: `assert`]") == ["assert"]
    assert cited_sources("A [source: raise] and B [source: `with`, try ] [source: raise]") == ["raise", "with", "try"]
    assert cited_sources("no citation") == []


def test_domain_metrics_on_hand_scored_answers():
    refusal = "I cannot answer that from the reference."
    questions = [
        {"prompt": "q1", "source": "assert", "answer": "Assert statements insert assertions."},
        {"prompt": "q2", "source": "raise", "answer": ["Raise raises.", "It raises an exception."]},
        {"prompt": "q3", "sources": ["with", "try"], "source": None, "answer": "The with statement wraps a block."},
        {"prompt": "q4", "source": "for"},  # no reference answer: citations and refusals only
        {"prompt": "q5", "source": None},
        {"prompt": "q6", "source": None},
    ]
    answers = [
        "Assert statements insert assertions. [source: `assert`]",  # exact match, right citation
        "it raises AN exception [source: `raise`, `yield`]",  # normalized match; 1 of 2 cited is right
        "The with statement wraps a code block. [source: `with`]",  # F1 < 1; recall 1 of 2
        refusal,  # over-refusal
        "I do not know that one.",  # an unanswerable question answered (unless the pattern counts it)
        refusal,
    ]
    got = domain_metrics(questions, answers, refusal)
    f1_q3 = token_f1("The with statement wraps a code block.", "The with statement wraps a block.")
    assert got["qa_exact_match"] == pytest.approx(1 / 3)
    assert got["qa_normalized_match"] == pytest.approx(2 / 3)
    assert got["qa_f1"] == pytest.approx((1 + 1 + f1_q3) / 3) and f1_q3 < 1
    # cited: {assert}, {raise, yield}, {with}, {} -> 3 right of 4 cited; gold: 1 + 1 + 2 + 1 = 5
    assert got["citation_precision"] == pytest.approx(3 / 4)
    assert got["citation_recall"] == pytest.approx(3 / 5)
    assert got["over_refusal"] == pytest.approx(1 / 4)
    assert got["under_refusal"] == pytest.approx(1 / 2)
    assert domain_metrics(questions, answers, refusal, [r"^I do not know"])["under_refusal"] == 0.0
    # nothing to measure -> the metric is absent, not 0
    assert set(domain_metrics(questions[3:4], answers[3:4])) == {"citation_precision", "citation_recall"}


def test_question_file_and_pattern_errors(tmp_path, corpora):
    from megatron_domain.config import ConfigError, config_from_dict
    from megatron_domain.eval.gates import metric_value
    from megatron_domain.eval.rubric import read_questions

    from conftest import tiny_config_dict

    bad = tmp_path / "questions.jsonl"
    bad.write_text('{"prompt": "a", "source": "x"}\n{"prompt": "b", "sources": "x"}\n')
    with pytest.raises(ValueError, match=r"questions.jsonl:2.*\"sources\" must be a list"):
        read_questions(str(bad))
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"questions.jsonl:1.*expected"):
        read_questions(str(bad))
    data = tiny_config_dict(corpora, tmp_path / "run")
    data["eval"] = {"generation": {"path": str(bad), "refusal_patterns": ["^I cannot", "(unclosed"]}}
    with pytest.raises(ConfigError, match=r"eval.generation.refusal_patterns\[1\]: '\(unclosed' is not a regular"):
        config_from_dict(data)
    with pytest.raises(KeyError, match=r"qa_f1.*not measured.*\"answer\" references"):
        metric_value({"generation": {"format_adherence": 1.0}}, "qa_f1")
