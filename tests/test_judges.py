"""Judges: the rubric's rules, the pairwise judge's position swap, its in-process model backend
against the model's own logits, its OpenAI backend against a real local HTTP server (answers,
retries, errors, timeouts), and the panel's votes and agreement."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from megatron_domain.config import JudgeConfig, RubricRuleConfig, config_from_dict
from megatron_domain.judges import JudgeError, JudgeResult, build_judge, score_all
from megatron_domain.judges.pairwise import ModelVerdicts, OpenAIVerdicts, PairwiseJudge, load_judge_model
from megatron_domain.judges.panel import PanelJudge
from megatron_domain.judges.rubric import RubricJudge
from megatron_domain.rollout.prompts import PromptRecord, chat_prompt_ids

HOUSE = RubricRuleConfig(name="format", pattern=r"^[^\n\[\]]+[.!?] \[source: `[a-z]+`\]$")
CITATION = RubricRuleConfig(name="citation", pattern=r"\[source: `{source}`\]", when="source")
REFUSAL = RubricRuleConfig(name="refusal", pattern=r"^I cannot answer that from the reference\.$", when="!source",
                           weight=2.0)


def prompt(source: str | None = "list", pid: str = "p0") -> PromptRecord:
    fields = {"source": source} if source else {}
    return PromptRecord(pid, messages=[{"role": "user", "content": f"what is {source or 'the weather'}?"}],
                        fields=fields)


def test_rubric_scores_rules_with_prompt_fields_and_gates():
    judge = RubricJudge([HOUSE, CITATION, REFUSAL])
    answers = ["A list holds values. [source: `list`]", "A list holds values. [source: `dict`]", "no idea",
               "I cannot answer that from the reference."]
    in_scope = judge.score(prompt("list"), answers)
    assert in_scope.scores == [1.0, 0.5, 0.0, 0.0]
    assert "citation: 0" in in_scope.rationales[1] and "refusal" not in in_scope.rationales[0]
    out_of_scope = judge.score(prompt(None), answers)  # only the format and refusal rules apply (weights 1, 2)
    assert out_of_scope.scores == pytest.approx([1 / 3, 1 / 3, 0.0, 2 / 3])


def test_rubric_pattern_placeholder_regex_quantifiers_survive():
    judge = RubricJudge([RubricRuleConfig(pattern=r"^a{2} `{source}`$")])
    assert judge.score(prompt("x.y"), ["aa `x.y`", "aa `xzy`"]).scores == [1.0, 0.0]  # the field is escaped


def refuse_unknown(fields: dict, answer: str):
    """A rubric function of the test: full score for refusing a question without a source."""
    if fields.get("source"):
        return None if answer == "crash" else (1.0, "in scope")
    return (float(answer.startswith("I cannot")), "refusal rule")


def test_rubric_function_rule_and_missing_score_names_the_prompt():
    judge = build_judge(JudgeConfig(kind="rubric", rules=[RubricRuleConfig(name="f", function=f"{__name__}:refuse_unknown")]))
    result = judge.score(prompt(None), ["I cannot say.", "sunny"])
    assert result.scores == [1.0, 0.0] and "refusal rule" in result.rationales[0]
    with pytest.raises(JudgeError, match="no score for completion.*prompt 'p7'"):
        score_all(judge, [prompt("list", "p7")], [["crash", "fine"]])
    with pytest.raises(JudgeError, match="needs the field 'source'"):
        RubricJudge([RubricRuleConfig(pattern="{source}")]).score(prompt(None), ["x"])
    with pytest.raises(JudgeError, match="cannot load 'nowhere:fn'"):
        RubricJudge([RubricRuleConfig(function="nowhere:fn")])


class ScriptedVerdicts:
    """A verdict backend that applies a fixed rule to the two answers it is shown."""

    def __init__(self, rule):
        self.rule, self.asked = rule, []

    def verdicts(self, chats):
        out = []
        for chat in chats:
            text = chat[0]["content"]
            a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
            b = text.split("Answer B:\n")[1].split("\n\nReply")[0]
            self.asked.append((a, b))
            out.append(self.rule(a, b))
        return out


def test_pairwise_asks_both_orders_and_counts_only_consistent_wins():
    longer = ScriptedVerdicts(lambda a, b: "A" if len(a) > len(b) else "B")
    result = PairwiseJudge(longer).score(prompt(), ["short", "a longer one", "the longest answer of all"])
    assert sorted(longer.asked) == sorted([(x, y) for x in ["short", "a longer one", "the longest answer of all"]
                                           for y in ["short", "a longer one", "the longest answer of all"] if x != y])
    assert result.scores == [0.0, 0.5, 1.0]
    assert result.stats["consistent"] == 3 and result.stats["comparisons"] == 3
    biased = PairwiseJudge(ScriptedVerdicts(lambda a, b: "A")).score(prompt(), ["one", "two"])
    assert biased.scores == [0.0, 0.0]  # position bias alone wins nothing: a tie
    assert biased.stats == {"comparisons": 1, "consistent": 0, "first_position_wins": 2, "verdicts": 2}


def test_panel_mean_majority_and_agreement():
    format_only = RubricJudge([HOUSE], "format")
    citation_only = RubricJudge([CITATION], "citation")
    answers = ["A list holds values. [source: `dict`]", "a list [source: `list`]", "nothing"]
    mean = PanelJudge([format_only, citation_only], "mean").score(prompt("list"), answers)
    assert mean.scores == [0.5, 0.5, 0.0] and mean.stats["panel_agreement"] == 0
    majority = PanelJudge([format_only, format_only, citation_only], "majority").score(prompt("list"), answers)
    assert majority.scores == pytest.approx([2 / 3, 1 / 3, 0.0])
    agreeing = PanelJudge([format_only, RubricJudge([HOUSE, CITATION])], "mean").score(
        prompt("list"), ["A list holds values. [source: `list`]", "nothing"])
    assert agreeing.stats["panel_agreement"] == 1 and agreeing.scores == [1.0, 0.0]


def test_panel_config_validates_its_members():
    from megatron_domain.config import ConfigError

    base = {"mode": "dpo", "model": {"preset": "tiny-test"}, "data": {"seq_len": 64},
            "dpo": {"online": True, "prompts": "p.jsonl", "judge": {"kind": "panel", "members": [
                {"kind": "rubric", "rules": [{"pattern": "x"}]}, {"kind": "pairwise", "backend": "openai"}]}}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(base)
    assert "dpo.judge.members[1].model" in str(err.value) and "dpo.judge.members[1].url" in str(err.value)


# ----------------------------------------------------------------------------- model backend


def test_model_verdicts_equal_the_models_next_token_choice(chat_run):
    """The batched, right-padded verdicts equal the judge model's own next-token comparison of
    "A" and "B", prompt by prompt."""
    model, tokenizer, template = load_judge_model(chat_run["sft"], torch.device("cpu"))
    backend = ModelVerdicts(model, tokenizer, template, torch.device("cpu"))
    chats = [[{"role": "user", "content": f"which is better: {a} or {b}?"}] for a, b in
             [("list", "module"), ("a longer question about the function", "x"), ("values", "error")]]
    got = backend.verdicts(chats)
    for chat, verdict in zip(chats, got):
        ids = chat_prompt_ids(chat, template, tokenizer)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1]  # [V]
        a, b = logits[backend.choice_ids].tolist()
        assert verdict == ("A" if a > b else "B")
    judged = PairwiseJudge(backend).score(prompt(), ["the list returns a list. [source: `list`]", "error error"])
    assert judged.stats["verdicts"] == 2 and len(judged.scores) == 2


# ----------------------------------------------------------------------------- OpenAI backend


class QuietHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that does not print the broken pipes of timed-out clients."""

    def handle_error(self, request, client_address):
        pass


class JudgeServer:
    """A real HTTP server on 127.0.0.1 answering /v1/chat/completions in OpenAI's shape: the
    longer answer wins; `fail_first` requests get HTTP 500 first; `delay_s` delays every reply."""

    def __init__(self, fail_first: int = 0, delay_s: float = 0.0):
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                time.sleep(delay_s)
                if server.requests <= fail_first:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"overloaded")
                    return
                text = body["messages"][0]["content"]
                a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
                b = text.split("Answer B:\n")[1].split("\n\nReply")[0]
                reply = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                              "content": "A" if len(a) > len(b) else "B"}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def openai_judge(url: str, timeout_s: float = 5.0, retries: int = 2) -> PairwiseJudge:
    return build_judge(JudgeConfig(kind="pairwise", backend="openai", url=url, model="judge", timeout_s=timeout_s,
                                   retries=retries, max_concurrency=4))


def test_openai_judge_scores_through_a_local_server_concurrently():
    server = JudgeServer()
    try:
        judge = openai_judge(server.url)
        prompts = [prompt(pid=f"p{i}") for i in range(6)]
        results = score_all(judge, prompts, [["x" * i, "y" * (i + 3)] for i in range(6)])
        assert all(r.scores == [0.0, 1.0] for r in results)
        assert server.requests == 12  # 6 prompts x both orders
    finally:
        server.close()


def test_openai_judge_retries_then_names_the_url():
    flaky = JudgeServer(fail_first=2)
    try:
        assert openai_judge(flaky.url, retries=2).score(prompt(), ["aaaa", "b"]).scores == [1.0, 0.0]
    finally:
        flaky.close()
    broken = JudgeServer(fail_first=100)
    try:
        with pytest.raises(JudgeError, match=f"judge.url {broken.url}: no answer after 2 attempt.*500"):
            openai_judge(broken.url, retries=1).score(prompt(), ["a", "b"])
    finally:
        broken.close()


def test_openai_judge_times_out_and_unreachable_server_is_named():
    slow = JudgeServer(delay_s=1.5)
    try:
        with pytest.raises(JudgeError, match="did not answer within 0.3 s"):
            openai_judge(slow.url, timeout_s=0.3, retries=0).score(prompt(), ["a", "b"])
    finally:
        slow.close()
    from parallel_harness import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(JudgeError, match=f"judge.url {url}"):
        OpenAIVerdicts(url, "judge", timeout_s=1.0, retries=0, backoff_s=0.0).verdicts([[{"role": "user",
                                                                                        "content": "?"}]])


def test_judge_result_round_trips_through_pickle():
    """Rank 0 broadcasts judge results to the other ranks as objects."""
    import pickle

    result = JudgeResult([1.0, None], ["a", "b"], {"k": 1})
    assert pickle.loads(pickle.dumps(result)) == result
