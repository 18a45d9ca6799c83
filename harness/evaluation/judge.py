"""An LLM judge: scores an answer 1-5 on helpfulness, relevance, accuracy and level of detail.

Two backends behind one interface (`judge.rate(question, answer) -> Judgment`):

  openai  any OpenAI-compatible chat endpoint (OpenAI, Azure-compatible proxies, vLLM, Ollama,
          LM Studio, ...): --judge_base_url, --judge_model, and the API key read from the environment
          variable named by --judge_api_key_env. The key is sent in the Authorization header and
          nowhere else: never logged, never written, masked out of any error text.
          The reply is parsed as JSON or as "Helpfulness: 4" lines; a reply that cannot be read is
          asked for again (--judge_parse_retries), then recorded as unparseable. Timeouts, 429 and
          5xx answers are retried with bounded exponential backoff (Retry-After honoured, capped).
  local   a transformers model (--judge_model: Hub id, folder or offline name). For each dimension
          it reads the model's probabilities of the tokens "1".."5" after a rating prompt and takes
          the expected score, so every answer gets a score even from a model too small to write a
          well-formed verdict.

Every judgment is cached in an append-only JSONL file keyed by sha256(question, answer, judge id,
prompt version): a rerun asks the judge nothing it has answered before. Changing the prompt below
means bumping PROMPT_VERSION, which keeps old judgments from being mixed with new ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from harness.data.examples import answer_ids, without_last_tokens
from harness.errors import UserError
from harness.evaluation.judge_scores import DIMENSION_NAMES, DIMENSIONS, parse_scores
from harness.models.loading import load_model, load_tokenizer
from harness.reporting.runs import append_record, read_records
from harness.run.config import ModelArguments, _help

PROMPT_VERSION = "judge-v1"

SYSTEM_PROMPT = (
    "You are an impartial judge of AI assistants' answers. Rate the answer to the user's question "
    "on four dimensions, each an integer from 1 (very poor) to 5 (excellent): helpfulness, relevance, "
    "accuracy and level of detail. Be strict: a vague, wrong or off-topic answer scores low."
)
USER_TEMPLATE = (
    "[Question]\n{question}\n\n[Answer]\n{answer}\n\n"
    'Reply with only this JSON object, filled in: {{"helpfulness": n, "relevance": n, "accuracy": n, '
    '"level_of_detail": n}}'
)
RETRY_REMINDER = (
    'Your reply could not be read. Reply with only the JSON object {"helpfulness": n, "relevance": n, '
    '"accuracy": n, "level_of_detail": n}, each n an integer from 1 to 5.'
)
LOCAL_TEMPLATE = (
    "Rate the {dimension} of the answer to the question below, from 1 (very poor) to 5 (excellent). "
    "Reply with one digit.\n\nQuestion: {question}\n\nAnswer: {answer}"
)


@dataclass
class JudgeArguments:
    judge_backend: str = field(
        default="openai",
        metadata=_help("openai: any OpenAI-compatible chat endpoint. local: a transformers model scoring by digit probabilities."),
    )
    judge_model: str = field(
        default="gpt-4o-mini",
        metadata=_help("The endpoint's model name (openai), or a Hub id / folder / offline model name (local)."),
    )
    judge_base_url: str = field(
        default="https://api.openai.com/v1",
        metadata=_help("OpenAI-compatible base URL; /chat/completions is added (e.g. http://localhost:8000/v1 for vLLM)."),
    )
    judge_api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata=_help("Name of the environment variable holding the API key (never the key itself). Empty: send no key."),
    )
    judge_timeout: float = field(default=60.0, metadata=_help("Seconds to wait for one judge reply."))
    judge_max_retries: int = field(
        default=5, metadata=_help("Retries of a request after a timeout, HTTP 429 or 5xx, with exponential backoff.")
    )
    judge_backoff_seconds: float = field(
        default=2.0, metadata=_help("First backoff wait; doubles per retry, capped at 60 s (Retry-After is honoured up to that).")
    )
    judge_parse_retries: int = field(
        default=2, metadata=_help("Times an unreadable verdict is asked for again before it is recorded as unparseable.")
    )
    judge_cache: str | None = field(
        default=None,
        metadata=_help("JSONL file of cached judgments (append-only). Unset: judgments.jsonl in output_dir."),
    )


@dataclass
class Judgment:
    scores: dict[str, float] | None  # every dimension, 1-5; None when unparseable
    status: str  # ok | unparseable
    judge: str
    attempts: int = 1
    raw: str | None = None  # the judge's text (openai), shortened; None for local scoring

    @property
    def mean(self) -> float | None:
        return sum(self.scores.values()) / len(self.scores) if self.scores else None


# ---------------------------------------------------------------------------- OpenAI-compatible

class OpenAICompatibleJudge:
    """A chat-completions endpoint, over urllib (no client library needed)."""

    def __init__(self, args: JudgeArguments, sleep: Callable[[float], None] = time.sleep):
        self.url = args.judge_base_url.rstrip("/") + "/chat/completions"
        self.model = args.judge_model
        self.args = args
        self.sleep = sleep
        self._key = _api_key(args.judge_api_key_env)
        self.id = f"openai-compatible:{self.model}@{args.judge_base_url.rstrip('/')}"
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if self._key and self.url.startswith("http://") and host not in ("localhost", "127.0.0.1", "::1"):
            print(f"warning: --judge_base_url is plain http to {host}: the API key crosses the network "
                  "unencrypted; use https", file=sys.stderr)

    def _mask(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def rate(self, question: str, answer: str) -> Judgment:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(question=question, answer=answer)},
        ]
        reply = ""
        for attempt in range(1, self.args.judge_parse_retries + 2):
            reply = self._mask(self._complete(messages))
            scores = parse_scores(reply)
            if scores is not None:
                return Judgment(scores, "ok", self.id, attempt, reply[:1000])
            messages = messages[:2] + [{"role": "assistant", "content": reply}, {"role": "user", "content": RETRY_REMINDER}]
        return Judgment(None, "unparseable", self.id, self.args.judge_parse_retries + 1, reply[:1000])

    def _request(self, messages: list[dict], max_tokens: int) -> urllib.request.Request:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")

    def _network_problem(self, exc: Exception) -> str:
        """Why a request got no HTTP answer at all, with the key masked."""
        reason = getattr(exc, "reason", exc)
        return "timed out" if isinstance(reason, (TimeoutError, socket.timeout)) else self._mask(str(reason))

    def _complete(self, messages: list[dict]) -> str:
        """The reply's text, retrying timeouts / 429 / 5xx with bounded backoff."""
        request = self._request(messages, max_tokens=200)
        problem = ""
        for attempt in range(self.args.judge_max_retries + 1):
            wait = min(self.args.judge_backoff_seconds * 2 ** attempt, MAX_BACKOFF_SECONDS)
            try:
                with urllib.request.urlopen(request, timeout=self.args.judge_timeout) as response:
                    payload = response.read().decode("utf-8", errors="replace")
                return _reply_text(payload)
            except urllib.error.HTTPError as exc:
                detail = self._mask(_error_detail(exc))
                if exc.code == 429 or exc.code >= 500:
                    problem = f"HTTP {exc.code}"
                    wait = _retry_after(exc, wait)
                else:
                    raise self._refusal(exc.code, detail) from None
            except NETWORK_ERRORS as exc:
                problem = self._network_problem(exc)
            if attempt < self.args.judge_max_retries:
                self.sleep(wait)
        raise UserError(
            f"judge endpoint {self.url} did not answer after {self.args.judge_max_retries + 1} tries ({problem}); "
            "judgments made so far are cached: rerun later, or raise --judge_timeout / --judge_max_retries"
        )

    def _refusal(self, code: int, detail: str) -> UserError:
        if code in (401, 403):
            return UserError(
                f"judge endpoint {self.url} refused the API key (HTTP {code}: {detail}); check the key in "
                f"${self.args.judge_api_key_env} and --judge_base_url"
            )
        return UserError(
            f"judge endpoint {self.url} answered HTTP {code} ({detail}); check --judge_model {self.model!r} "
            "and --judge_base_url"
        )

    def probe(self) -> None:
        """One one-token request, before any training: a wrong URL, key or model name fails in seconds
        instead of after hours of training and decoding. Costs a few tokens."""
        request = self._request([{"role": "user", "content": "Reply with 1."}], max_tokens=1)
        try:
            with urllib.request.urlopen(request, timeout=min(self.args.judge_timeout, PROBE_TIMEOUT_SECONDS)) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = self._mask(_error_detail(exc))
            if "quota" in detail.lower():  # OpenAI's 429 insufficient_quota does not pass with retries
                raise UserError(f"judge endpoint {self.url} has no quota left for this key ({detail}); "
                                "add credit or use another --judge_base_url / key") from None
            if exc.code == 429 or exc.code >= 500:
                return  # reachable and busy: the real requests retry with backoff
            raise self._refusal(exc.code, detail) from None
        except NETWORK_ERRORS as exc:
            raise UserError(
                f"judge endpoint {self.url} cannot be reached ({self._network_problem(exc)}); check --judge_base_url "
                "and the network (checked before training, so nothing was trained)"
            ) from None


MAX_BACKOFF_SECONDS = 60.0
PROBE_TIMEOUT_SECONDS = 15.0
NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError)  # no HTTP answer at all


def _api_key(env_name: str) -> str | None:
    if not env_name:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise UserError(
            f"the judge needs an API key in the environment variable {env_name}, which is not set; "
            f"export {env_name}=..., pass --judge_api_key_env NAME, or --judge_api_key_env '' for an endpoint without keys"
        )
    return key


def _reply_text(payload: str) -> str:
    """The assistant's text in a chat-completions response; '' when the response is not one (parsed as unreadable)."""
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return payload[:1000]
    return content if isinstance(content, str) else json.dumps(content)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", errors="replace")
        message = json.loads(text).get("error", {}).get("message") or text
    except Exception:  # an error page in any shape: the status code is what matters
        message = exc.reason or ""
    return " ".join(str(message).split())[:200]


def _retry_after(exc: urllib.error.HTTPError, default: float) -> float:
    try:
        return min(max(float(exc.headers.get("Retry-After", "")), 0.0), MAX_BACKOFF_SECONDS)
    except (TypeError, ValueError):
        return default


# ---------------------------------------------------------------------------- local model

class LocalModelJudge:
    """Expected score over the digit tokens 1..5, per dimension, from a local causal LM."""

    def __init__(self, args: JudgeArguments, max_positions: int | None = None):
        import torch


        model_args = ModelArguments(model=args.judge_model)
        self.tokenizer = load_tokenizer(model_args)
        self.model = load_model(model_args, "full", False, for_training=False).eval()
        self.device = next(self.model.parameters()).device
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_positions = min(limit, max_positions or limit)
        self.id = f"local:{args.judge_model}:digit-probabilities"
        self._torch = torch

    def _prompt(self, dimension: str, question: str, answer: str) -> str:
        text = LOCAL_TEMPLATE.format(dimension=DIMENSION_NAMES[dimension].lower(), question=question, answer=answer)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"{text}\n\n{DIMENSION_NAMES[dimension]} (1-5):"

    def _ids(self, text: str, **kwargs) -> list[int]:
        # A chat template that writes the BOS itself must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=special, verbose=False, **kwargs)["input_ids"]

    def _digit_ids(self, prompt: str) -> list[int]:
        ids = [answer_ids(self.tokenizer, prompt, str(d))[0] for d in range(1, 6)]
        if len(set(ids)) != 5:
            raise UserError(f"judge model {self.id}: its tokenizer does not give the digits 1-5 distinct first tokens; use another --judge_model")
        return ids

    def _fit(self, question: str, answer: str) -> tuple[str, str]:
        """Cut the answer (then the question) by tokens so the longest prompt fits the model, " ..." marking a cut.
        Each round keeps a strictly shorter prefix of the text (harness.data.examples.without_last_tokens), so the
        rounds end (at most one per character; re-tokenizing a cut text shifts a few tokens, so one or two settle it)."""
        longest = max(DIMENSIONS, key=lambda d: len(DIMENSION_NAMES[d]))
        texts = {"question": question, "answer": answer}

        def over() -> int:
            prompt = self._prompt(longest, texts["question"], texts["answer"])
            return len(self._ids(prompt)) - (self.max_positions - 1)

        for part in ("answer", "question"):
            kept = texts[part]
            for _ in range(len(kept) + 1):
                excess = over()
                if excess <= 0:
                    return texts["question"], texts["answer"]
                if not kept:
                    break
                kept = without_last_tokens(self.tokenizer, kept, excess + 8)
                texts[part] = kept + " ..."
        if over() > 0:
            raise UserError(f"judge model {self.id}: its {self.max_positions} positions do not hold the judging prompt "
                            "even with the question and answer cut away; use a judge model with a longer context")
        return texts["question"], texts["answer"]

    def rate(self, question: str, answer: str) -> Judgment:
        torch = self._torch
        question, answer = self._fit(question, answer)
        prompts = [self._prompt(d, question, answer) for d in DIMENSIONS]
        digit_ids = self._digit_ids(prompts[0])
        scores = {}
        with torch.no_grad():
            for dimension, prompt in zip(DIMENSIONS, prompts):
                ids = torch.tensor([self._ids(prompt)], device=self.device)
                logits = self.model(input_ids=ids).logits[0, -1].float()
                probabilities = torch.softmax(logits[digit_ids], dim=-1)
                scores[dimension] = round(float((probabilities * torch.arange(1, 6, device=probabilities.device)).sum()), 4)
        return Judgment(scores, "ok", self.id)


# ---------------------------------------------------------------------------- cache

def cache_key(question: str, answer: str, judge_id: str) -> str:
    text = json.dumps([question, answer, judge_id, PROMPT_VERSION], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Append-only JSONL of judgments; a torn last line (a crash mid-write) is skipped on load."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries = {r["key"]: r for r in read_records(self.path) if "key" in r}
        self.hits = 0

    def get(self, key: str) -> Judgment | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.hits += 1
        return Judgment(entry["scores"], entry["status"], entry["judge"], entry.get("attempts", 1), entry.get("raw"))

    def put(self, key: str, question: str, answer: str, judgment: Judgment) -> None:
        entry = {"key": key, "prompt_version": PROMPT_VERSION, **asdict(judgment), "question": question, "answer": answer}
        append_record(self.path, entry)
        self.entries[key] = entry


def judge_all(judge, items: Iterable[tuple[str, str]], cache: JudgmentCache,
              progress: Callable[[int, int], None] | None = None) -> list[Judgment]:
    """A judgment per (question, answer), from the cache where it holds one; new ones are cached at once."""
    items = list(items)
    results = []
    for number, (question, answer) in enumerate(items, start=1):
        key = cache_key(question, answer, judge.id)
        judgment = cache.get(key)
        if judgment is None:
            judgment = judge.rate(question, answer)
            cache.put(key, question, answer, judgment)
        results.append(judgment)
        if progress:
            progress(number, len(items))
    return results


def check_judge_settings(args: JudgeArguments) -> None:
    """Refuse a judge that cannot work before any training starts."""
    if args.judge_backend not in ("openai", "local"):
        raise UserError(f"unknown --judge_backend {args.judge_backend!r}; use openai or local")
    if args.judge_backend == "openai":
        if not args.judge_base_url.startswith(("http://", "https://")):
            raise UserError(f"--judge_base_url {args.judge_base_url!r} must start with http:// or https://")
        _api_key(args.judge_api_key_env)
    if args.judge_max_retries < 0 or args.judge_parse_retries < 0 or args.judge_timeout <= 0:
        raise UserError("--judge_max_retries and --judge_parse_retries must be >= 0 and --judge_timeout > 0")
    if args.judge_cache and Path(args.judge_cache).is_dir():
        raise UserError(f"--judge_cache {args.judge_cache} is a folder; pass a .jsonl file (created if missing)")


def check_judge_reachable(args: JudgeArguments) -> None:
    """The judge is first needed after training and decoding: an OpenAI-compatible one answers one tiny
    request now, a local one's tokenizer loads now, or the run is refused before anything is trained."""
    if args.judge_backend == "openai":
        OpenAICompatibleJudge(args).probe()
    else:

        load_tokenizer(ModelArguments(model=args.judge_model))  # an unknown name or folder is refused here


def build_judge(args: JudgeArguments):
    check_judge_settings(args)
    return OpenAICompatibleJudge(args) if args.judge_backend == "openai" else LocalModelJudge(args)
