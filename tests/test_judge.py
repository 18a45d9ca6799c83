"""The judge against a real HTTP server on 127.0.0.1 that answers like an OpenAI-compatible endpoint
(well-formed, malformed, slow, 429, 401), the cache, the API key's secrecy, and the local backend."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.errors import UserError
from harness.evaluation.judge import (
    JudgeArguments,
    JudgmentCache,
    LocalModelJudge,
    OpenAICompatibleJudge,
    build_judge,
    cache_key,
    judge_all,
)
from harness.evaluation.judge_scores import DIMENSIONS, parse_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "sk-test-0123456789-SECRET-never-written"
GOOD = '{"helpfulness": 4, "relevance": 5, "accuracy": 3, "level_of_detail": 2}'


class FakeEndpoint:
    """Answers POST /v1/chat/completions from a script of actions, then with GOOD."""

    def __init__(self):
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                kind, *args = endpoint.script.pop(0) if endpoint.script else ("reply", GOOD)
                if kind == "slow":
                    time.sleep(args[0])
                    kind, args = "reply", [GOOD]
                if kind == "reply":
                    self._send(200, {"choices": [{"message": {"role": "assistant", "content": args[0]}}]})
                elif kind == "status":
                    status, payload, headers = args
                    self._send(status, payload, headers)

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                    pass

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def endpoint(monkeypatch):
    monkeypatch.setenv("FT_TEST_JUDGE_KEY", KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = FakeEndpoint()
    yield server
    server.server.shutdown()
    server.server.server_close()


def make_judge(endpoint, sleeps=None, **overrides):
    settings = dict(judge_backend="openai", judge_model="judge-1", judge_base_url=endpoint.url,
                    judge_api_key_env="FT_TEST_JUDGE_KEY", judge_timeout=5.0, judge_max_retries=2,
                    judge_backoff_seconds=0.5, judge_parse_retries=1)
    settings.update(overrides)
    return OpenAICompatibleJudge(JudgeArguments(**settings), sleep=(sleeps.append if sleeps is not None else lambda s: None))


def test_parse_scores_reads_json_and_lines_and_refuses_the_rest():
    expected = {"helpfulness": 4.0, "relevance": 5.0, "accuracy": 3.0, "level_of_detail": 2.0}
    assert parse_scores(GOOD) == expected
    assert parse_scores('Here you go:\n```json\n{"Helpfulness": "4", "Relevance": 5, "Accuracy": 3, "Level of detail": 2}\n```') == expected
    assert parse_scores("Helpfulness (1-5): 4\nRelevance: 5/5\n**Accuracy**: 3\nLevel of detail - 2") == expected
    assert parse_scores("Helpfulness: 4, Relevance: 5") is None  # two dimensions missing
    assert parse_scores('{"helpfulness": 9, "relevance": 5, "accuracy": 3, "level_of_detail": 2}') is None  # off scale
    assert parse_scores("A fine answer overall.") is None


def test_well_formed_reply(endpoint):
    judgment = make_judge(endpoint).rate("What is 2+2?", "4")
    assert judgment.status == "ok" and judgment.attempts == 1
    assert judgment.scores == {"helpfulness": 4.0, "relevance": 5.0, "accuracy": 3.0, "level_of_detail": 2.0}
    assert judgment.mean == 3.5
    request = endpoint.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {KEY}"  # the key travels in the header, and only there
    assert request["body"]["model"] == "judge-1" and request["body"]["temperature"] == 0
    assert "What is 2+2?" in request["body"]["messages"][-1]["content"]


def test_malformed_reply_is_asked_again_then_recorded_as_unparseable(endpoint):
    endpoint.script = [("reply", "It is quite good, I'd say.")]
    judgment = make_judge(endpoint).rate("q", "a")
    assert judgment.status == "ok" and judgment.attempts == 2
    assert "could not be read" in endpoint.requests[1]["body"]["messages"][-1]["content"]

    endpoint.script = [("reply", "no scores"), ("reply", "still none")]
    judgment = make_judge(endpoint).rate("q", "a")  # 1 parse retry allowed
    assert judgment.status == "unparseable" and judgment.scores is None and judgment.mean is None
    assert judgment.attempts == 2 and judgment.raw == "still none"
    assert len(endpoint.requests) == 4


def test_timeout_and_429_are_retried_with_bounded_backoff(endpoint):
    sleeps: list[float] = []
    endpoint.script = [("slow", 1.5)]
    judgment = make_judge(endpoint, sleeps, judge_timeout=0.3).rate("q", "a")
    assert judgment.status == "ok" and sleeps == [0.5]
    assert len(endpoint.requests) == 2

    sleeps.clear()
    endpoint.script = [("status", 429, {"error": {"message": "rate limited"}}, {"Retry-After": "7"}),
                       ("status", 503, {"error": {"message": "overloaded"}}, {})]
    assert make_judge(endpoint, sleeps).rate("q", "a").status == "ok"
    assert sleeps == [7.0, 1.0]  # Retry-After honoured, then exponential backoff

    sleeps.clear()
    endpoint.requests.clear()
    endpoint.script = [("status", 429, {}, {"Retry-After": "9999"})] * 3
    with pytest.raises(UserError, match=r"did not answer after 3 tries \(HTTP 429\)"):
        make_judge(endpoint, sleeps).rate("q", "a")
    assert len(endpoint.requests) == 3 and sleeps == [60.0, 60.0]  # capped, and no wait after the last try


def test_bad_key_and_bad_model_fail_in_one_line_without_the_key(endpoint, monkeypatch):
    endpoint.script = [("status", 401, {"error": {"message": f"Incorrect API key provided: {KEY}"}}, {})]
    with pytest.raises(UserError) as refused:
        make_judge(endpoint).rate("q", "a")
    assert "refused the API key" in str(refused.value) and "FT_TEST_JUDGE_KEY" in str(refused.value)
    assert KEY not in str(refused.value) and "\n" not in str(refused.value)

    endpoint.script = [("status", 404, {"error": {"message": "model judge-1 does not exist"}}, {})]
    with pytest.raises(UserError, match="HTTP 404.*does not exist.*--judge_model"):
        make_judge(endpoint).rate("q", "a")

    monkeypatch.delenv("FT_TEST_JUDGE_KEY")
    with pytest.raises(UserError, match="environment variable FT_TEST_JUDGE_KEY, which is not set"):
        make_judge(endpoint)
    # An endpoint without keys (a local vLLM server): no Authorization header at all.
    make_judge(endpoint, judge_api_key_env="").rate("q", "a")
    assert endpoint.requests[-1]["auth"] is None


def test_judgments_are_cached_and_the_key_is_never_written(endpoint, tmp_path, capsys):
    cache_file = tmp_path / "judgments.jsonl"
    items = [("What is 2+2?", "4"), ("Name a colour.", "Blue"), ("What is 2+2?", "5")]
    endpoint.script = [("reply", "unreadable")] * 2  # the first item ends unparseable
    first = judge_all(make_judge(endpoint), items, JudgmentCache(cache_file))
    assert [j.status for j in first] == ["unparseable", "ok", "ok"]
    asked = len(endpoint.requests)

    cache = JudgmentCache(cache_file)
    again = judge_all(make_judge(endpoint), items, cache)
    assert len(endpoint.requests) == asked and cache.hits == 3  # nothing asked twice
    assert [j.scores for j in again] == [j.scores for j in first]

    # A different judge (model) or prompt version is a different key: asked afresh.
    judge_all(make_judge(endpoint, judge_model="judge-2"), items[:1], cache)
    assert len(endpoint.requests) == asked + 1
    assert cache_key("q", "a", "x") != cache_key("q", "a", "y")

    # A record torn by a crash mid-write is skipped; the rest stays usable.
    with cache_file.open("a") as f:
        f.write('{"key": "half a rec')
    reloaded = JudgmentCache(cache_file)
    assert len(reloaded.entries) == 4
    judge_all(make_judge(endpoint), [("New question?", "Yes")], reloaded)
    assert len(JudgmentCache(cache_file).entries) == 5

    # The key went out in headers only: not in the cache, any file, or anything printed.
    endpoint.script = [("status", 401, {"error": {"message": f"bad key {KEY}"}}, {})]
    with pytest.raises(UserError):
        judge_all(make_judge(endpoint), [("Another?", "No")], JudgmentCache(cache_file))
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_settings_are_checked_before_anything_runs(monkeypatch):
    with pytest.raises(UserError, match="unknown --judge_backend"):
        build_judge(JudgeArguments(judge_backend="gpt"))
    monkeypatch.setenv("FT_TEST_JUDGE_KEY", KEY)
    with pytest.raises(UserError, match="must start with http"):
        build_judge(JudgeArguments(judge_base_url="api.openai.com", judge_api_key_env="FT_TEST_JUDGE_KEY"))


def test_local_judge_scores_every_dimension_from_digit_probabilities():
    judge = LocalModelJudge(JudgeArguments(judge_backend="local", judge_model="tiny-llama"), max_positions=160)
    first = judge.rate("Name a colour.", "Blue.")
    assert first.status == "ok" and set(first.scores) == set(DIMENSIONS)
    assert all(1.0 <= s <= 5.0 for s in first.scores.values())
    assert judge.rate("Name a colour.", "Blue.").scores == first.scores  # deterministic
    assert judge.id == "local:tiny-llama:digit-probabilities"
    # An answer far longer than the judge's window is cut to fit, not refused.
    long = judge.rate("Tell a story.", "Once upon a time there was a dog. " * 200)
    assert long.status == "ok" and all(1.0 <= s <= 5.0 for s in long.scores.values())

    # Two answers whose digit probabilities differ: the model's next token is made "5" after one and "1" after the
    # other (every token that reads as that digit, whichever the judge takes), for every dimension's prompt.
    tokenizer = judge.tokenizer
    digits = {d: [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == str(d)] for d in (1, 5)}
    assert all(digits.values())

    def favour_a_digit(module, args, kwargs, output):
        text = tokenizer.decode(kwargs["input_ids"][0])
        digit = 5 if "Blue." in text else 1 if "Green." in text else None
        if digit is not None:
            output.logits[..., digits[digit]] += 30.0
        return output

    hook = judge.model.register_forward_hook(favour_a_digit, with_kwargs=True)
    try:
        good, bad = judge.rate("Name a colour.", "Blue."), judge.rate("Name a colour.", "Green.")
    finally:
        hook.remove()
    assert good.scores == pytest.approx(dict.fromkeys(DIMENSIONS, 5.0), abs=0.01)  # the expected digit, per dimension
    assert bad.scores == pytest.approx(dict.fromkeys(DIMENSIONS, 1.0), abs=0.01)


def test_the_alpaca100_recipe_asks_its_judge_before_training(endpoint, tmp_path, capsys):
    """A wrong key, model or URL used to surface only after selection, training and decoding."""
    from harness.alpaca100.pipeline import run_select_train_judge
    from harness.run.flow import load_recipe

    recipe = load_recipe("llama2_7b_lora_alpaca100")
    argv = ["--model", "stories260k", "--quantization", "none", "--output_dir", str(tmp_path / "run"),
            "--judge_base_url", endpoint.url, "--judge_api_key_env", "FT_TEST_JUDGE_KEY", "--judge_model", "judge-1"]
    for status, payload, expected in (
        (401, {"error": {"message": "Incorrect API key provided"}}, "refused the API key"),
        (404, {"error": {"message": "The model judge-1 does not exist"}}, "HTTP 404"),
        (429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota"}}, "no quota left"),
    ):
        endpoint.script = [("status", status, payload, {})]
        started = time.monotonic()
        with pytest.raises(SystemExit) as stop:
            run_select_train_judge("llama2_7b_lora_alpaca100", recipe.DEFAULTS, argv)
        assert stop.value.code == 2 and time.monotonic() - started < 60
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and KEY not in err[0], err
        assert not (tmp_path / "run").exists()  # nothing selected, trained or written
    assert [r["body"]["max_tokens"] for r in endpoint.requests] == [1, 1, 1]  # one tiny request each
