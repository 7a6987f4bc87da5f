"""LLM judge client against a real local HTTP server: order randomisation, retries, resume, key secrecy."""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from _eval_helpers import write_jsonl

from dwakd.evaluation.judge import (
    TEMPLATE_VERSION,
    ChatClient,
    JudgeError,
    load_responses,
    order_is_swapped,
    parse_verdict,
    run_judge,
)

SECRET = "sk-test-5f3a9c1e-DO-NOT-LEAK"
N_ROWS = 12
TIE_ITEMS = {3, 7}  # both models give the same answer here: the fake judge says "Tie"


class FakeJudge:
    """A chat-completions server on 127.0.0.1: scripted failures first, then it prefers the response with 'GOOD'."""

    def __init__(self, script: list[tuple[int, str]] | None = None, fail_after: int | None = None):
        self.script = list(script or [])
        self.fail_after = fail_after  # after this many answers, every request gets a 503
        self.requests: list[dict] = []  # every request: auth header, body, what was answered
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                record = {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                judge.requests.append(record)
                answered = sum(1 for r in judge.requests if r.get("status") == 200)
                if judge.fail_after is not None and answered >= judge.fail_after:
                    status, text = 503, f"overloaded (request had {record['auth']})"
                elif judge.script:
                    status, text = judge.script.pop(0)
                else:
                    status, text = 200, judge.decide(body["messages"][0]["content"])
                record["status"], record["answer"] = status, text
                payload = (json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                           if status == 200 else json.dumps({"error": {"message": text}}))
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @staticmethod
    def decide(prompt: str) -> str:
        a = prompt.split("[Response A]")[1].split("[Response B]")[0]
        b = prompt.split("[Response B]")[1]
        if "GOOD" in a and "GOOD" not in b:
            return "A"
        if "GOOD" in b and "GOOD" not in a:
            return "[[B]]"
        return "Tie."

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _responses(tmp_path: Path) -> tuple[dict, dict]:
    good, bad = [], []
    for i in range(N_ROWS):
        base = {"index": i, "instruction": f"Question {i}?", "input": "", "references": ["x"]}
        same = "SAME answer" if i in TIE_ITEMS else None
        good.append({**base, "response": same or f"GOOD answer {i}"})
        bad.append({**base, "response": same or f"poor answer {i}"})
    return (load_responses(write_jsonl(tmp_path / "good.jsonl", good)),
            load_responses(write_jsonl(tmp_path / "bad.jsonl", bad)))


def _client(url: str, **kw) -> ChatClient:
    return ChatClient(url, "fake-judge", api_key_env="DWAKD_TEST_JUDGE_KEY", backoff=0.001, **kw)


def _assert_secret_nowhere(tmp_path: Path, *texts: str) -> None:
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"API key written to {path}"
    for text in texts:
        assert SECRET not in text


def test_parse_verdict():
    verdicts = [parse_verdict(t) for t in ["A", " b\n", "[[A]]", '"Tie".', "tied", "**B**"]]
    assert verdicts == ["A", "B", "A", "tie", "tie", "B"]
    assert parse_verdict("A is better because") is None and parse_verdict("") is None


def test_judge_against_local_server(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("DWAKD_TEST_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    good, bad = _responses(tmp_path)
    out = tmp_path / "judge" / "verdicts.jsonl"
    # First request: 429 (rate limit), then 500, then one unparseable answer; all must be retried.
    with FakeJudge([(429, "slow down"), (500, "oops"), (200, "Maybe?")]) as server:
        summary = run_judge(("good", good), ("bad", bad), _client(server.url), out, n_items=10,
                            sample_seed=1, order_seed=5, progress=False)
        requests = list(server.requests)

        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 10 and len({r["index"] for r in rows}) == 10
        assert [r["status"] for r in requests[:3]] == [429, 500, 200] and len(requests) == 10 + 3
        assert all(r["auth"] == f"Bearer {SECRET}" and r["path"] == "/v1/chat/completions" for r in requests)
        assert rows[0]["attempts"] == 2  # the "Maybe?" answer was asked again

        # Order randomisation: recorded per item, reproducible from (order_seed, index), both orders occur,
        # and the judge really saw the responses in the recorded order.
        assert {r["swapped"] for r in rows} == {True, False}
        answered = [r for r in requests if r["status"] == 200 and parse_verdict(r["answer"])]
        for row, request in zip(rows, answered):
            assert row["swapped"] == order_is_swapped(5, row["index"])
            prompt = request["body"]["messages"][0]["content"]
            assert f"Question {row['index']}?" in prompt
            position_a = prompt.split("[Response A]")[1].split("[Response B]")[0]
            if row["index"] not in TIE_ITEMS:
                assert ("GOOD" in position_a) == (row["response_a"] == "good")
            assert row["template_version"] == TEMPLATE_VERSION

        # Win/tie/loss against an independent count: "good" wins every item that is not a tie.
        n_ties = len({r["index"] for r in rows} & TIE_ITEMS)
        assert (summary.wins, summary.ties, summary.losses, summary.invalid) == (10 - n_ties, n_ties, 0, 0)
        assert summary.rates()["win"] == pytest.approx((10 - n_ties) / 10)

        # Rerun: everything is done, no request is sent, same result.
        again = run_judge(("good", good), ("bad", bad), _client(server.url), out, n_items=10,
                          sample_seed=1, order_seed=5, progress=False)
        assert again == summary and len(server.requests) == len(requests)
    print(summary.format())
    captured = capsys.readouterr()
    _assert_secret_nowhere(tmp_path, caplog.text, captured.out, captured.err)


def test_judge_resume_after_failure(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DWAKD_TEST_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    good, bad = _responses(tmp_path)
    with FakeJudge() as server:
        full = run_judge(("good", good), ("bad", bad), _client(server.url), tmp_path / "full.jsonl",
                         n_items=8, sample_seed=2, order_seed=0, progress=False)
    # The endpoint answers 3 items, then fails with 503 (echoing the Authorization header): retries run out.
    out = tmp_path / "resumed.jsonl"
    with FakeJudge(fail_after=3) as server:
        with pytest.raises(JudgeError) as err:
            run_judge(("good", good), ("bad", bad), _client(server.url, max_retries=2), out, n_items=8,
                      sample_seed=2, order_seed=0, progress=False)
        assert len(server.requests) == 3 + 3  # 3 answers, then 1 try + 2 retries
    assert SECRET not in str(err.value)
    assert len(out.read_text().splitlines()) == 3
    with FakeJudge() as server:
        resumed = run_judge(("good", good), ("bad", bad), _client(server.url), out, n_items=8,
                            sample_seed=2, order_seed=0, progress=False)
        assert len(server.requests) == 8 - 3  # only the items without a verdict
    assert resumed == full and resumed.decided == 8
    assert sorted(json.loads(x)["index"] for x in out.read_text().splitlines()) == \
        sorted(json.loads(x)["index"] for x in (tmp_path / "full.jsonl").read_text().splitlines())
    _assert_secret_nowhere(tmp_path, caplog.text)


def test_missing_key_and_non_retryable_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DWAKD_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="DWAKD_TEST_JUDGE_KEY"):
        _client("http://127.0.0.1:9")
    monkeypatch.setenv("DWAKD_TEST_JUDGE_KEY", SECRET)
    with FakeJudge([(401, "bad key")]) as server:
        client = _client(server.url)
        assert SECRET not in repr(client)
        with pytest.raises(JudgeError, match=re.escape("HTTP 401")):
            client.complete("hello")
        assert len(server.requests) == 1  # not retried


def test_judge_command(tmp_path, monkeypatch, capsys, caplog):
    from dwakd.cli import main

    monkeypatch.setenv("DWAKD_TEST_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    _responses(tmp_path)
    out = tmp_path / "verdicts.jsonl"
    with FakeJudge([(500, "oops")]) as server:
        code = main(["judge", "--first", f"good={tmp_path / 'good.jsonl'}", "--second", f"bad={tmp_path / 'bad.jsonl'}",
                     "--base-url", server.url, "--judge-model", "fake-judge", "--api-key-env", "DWAKD_TEST_JUDGE_KEY",
                     "--n-items", "5", "--backoff", "0.001", "--out", str(out), "--no-progress"])
        assert code == 0 and len(server.requests) == 6
    captured = capsys.readouterr()
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    wins = sum(r["winner"] == "good" for r in rows)
    assert (summary["wins"], summary["ties"], summary["losses"]) == (wins, 5 - wins, 0)
    assert f"win {100 * wins / 5:.1f}% ({wins})" in captured.out
    _assert_secret_nowhere(tmp_path, caplog.text, captured.out, captured.err)
