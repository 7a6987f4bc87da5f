"""LLM-as-judge pairwise comparison (paper Section 4.3) through any OpenAI-compatible chat-completions endpoint.

Protocol: N items sampled (seeded) from the items both models answered; per item the two responses are put in
A/B order by a coin drawn from (order_seed, item index), so the order is random per item yet reproducible and
recorded; a fixed, versioned prompt template; the judge answers "A", "B" or "Tie". Every verdict is appended to
a JSONL file as it arrives; a rerun skips items that already have a valid verdict.

The paper's exact template (its Figure 4) is not in the text we have; `TEMPLATE_V1` follows the pairwise
judge prompt of the DSKD reference code (songmzhang/DSKD, `code/analysis/llm_judge.py`) in our own words, with
an explicit instruction to ignore position and length. Change the text only together with `TEMPLATE_VERSION`.

Security: the API key is read from an environment variable (default OPENAI_API_KEY) when the client is built,
sent only in the Authorization header, and never logged, printed, stored in results or put in error messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMPLATE_VERSION = "dwakd-pairwise-v1"
TEMPLATE_V1 = """Please act as an impartial judge and compare the quality of two responses, written by two \
AI assistants, to the user instruction shown below. Decide which response follows the instruction better, \
considering helpfulness, relevance, accuracy, depth, creativity and level of detail. Do not let the order in \
which the \
responses are shown or their length influence your decision.

Answer with exactly one word:
- "A" if Response A is clearly better;
- "B" if Response B is clearly better;
- "Tie" if both are of similar quality (both good or both poor).

[Instruction]
{instruction}
{input_block}
[Response A]
{response_a}

[Response B]
{response_b}
"""
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class JudgeError(RuntimeError):
    """The judge endpoint failed in a way retries cannot fix (or retries ran out)."""


def build_judge_prompt(instruction: str, input_text: str, response_a: str, response_b: str) -> str:
    """The user message of `TEMPLATE_V1` for one item."""
    input_block = f"\n[Input]\n{input_text}\n" if input_text and input_text.strip() else ""
    return TEMPLATE_V1.format(instruction=instruction, input_block=input_block,
                              response_a=response_a, response_b=response_b)


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from a judge answer such as 'A', '[[B]]', '"Tie".'; None if it is not one of them."""
    word = text.strip().strip("[]()*\"'`.:! \n").lower()
    if word in ("a", "response a"):
        return "A"
    if word in ("b", "response b"):
        return "B"
    if word in ("tie", "tied", "c"):
        return "tie"
    return None


def order_is_swapped(order_seed: int, index: int) -> bool:
    """The per-item coin: True puts the second model's response in position A."""
    digest = hashlib.sha256(f"dwakd-judge-order/{order_seed}/{index}".encode()).digest()
    return bool(digest[0] & 1)


class ChatClient:
    """Minimal OpenAI-compatible chat-completions client (urllib) with retries and exponential backoff."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 16,
        timeout: float = 60.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        key = os.environ.get(api_key_env)
        if not key:
            raise JudgeError(f"environment variable {api_key_env} is not set; export the judge's API key there")
        self.__key = key
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self.__key, "***")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(self.max_backoff, self.backoff * 2**attempt)

    def complete(self, user_message: str) -> str:
        """Send one user message; return the assistant's text. Retries 429/5xx/network errors with backoff."""
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": user_message}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }).encode("utf-8")
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, method="POST", headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {self.__key}"})
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return str(payload["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as exc:
                detail = self._redact(exc.read().decode("utf-8", "replace")[:300])
                if exc.code not in RETRYABLE_STATUS:
                    raise JudgeError(f"judge endpoint {self.url} answered HTTP {exc.code}: {detail}") from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                last_problem = f"HTTP {exc.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last_problem = self._redact(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                last_problem = f"malformed response ({type(exc).__name__})"
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                logger.warning("judge request failed (%s); retry %d/%d in %.2f s",
                               last_problem, attempt + 1, self.max_retries, delay)
                self._sleep(delay)
        raise JudgeError(f"judge endpoint {self.url} failed {self.max_retries + 1} times; last: {last_problem}")


@dataclass(frozen=True)
class JudgeSummary:
    """Win/tie/loss of `first` against `second` over the items with a valid verdict."""

    first: str
    second: str
    wins: int
    ties: int
    losses: int
    invalid: int

    @property
    def decided(self) -> int:
        return self.wins + self.ties + self.losses

    def rates(self) -> dict[str, float]:
        """Win, tie and loss rates (fractions of items with a valid verdict)."""
        n = self.decided
        return {k: (v / n if n else 0.0) for k, v in (("win", self.wins), ("tie", self.ties), ("loss", self.losses))}

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first, "second": self.second, "wins": self.wins, "ties": self.ties,
                "losses": self.losses, "invalid": self.invalid, "n": self.decided, "rates": self.rates()}

    def format(self) -> str:
        """One line: 'A vs B: win 45.0% (45) | tie 20.0% (20) | loss 35.0% (35) over 100 items'."""
        r = self.rates()
        text = (f"{self.first} vs {self.second}: win {100 * r['win']:.1f}% ({self.wins}) | "
                f"tie {100 * r['tie']:.1f}% ({self.ties}) | loss {100 * r['loss']:.1f}% ({self.losses}) "
                f"over {self.decided} items")
        return text + (f"; {self.invalid} without a valid verdict" if self.invalid else "")


def load_responses(path: str | Path) -> dict[int, dict]:
    """Rows of a generation JSONL (from `dwakd eval`) by item index; rows need index, instruction, response."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such responses file")
    rows: dict[int, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
        for key in ("index", "response"):
            if key not in row:
                raise ValueError(f"{path}, line {number}: missing field {key!r}")
        if "instruction" not in row and "prompt" not in row:
            raise ValueError(f"{path}, line {number}: needs 'instruction' (or 'prompt')")
        rows[int(row["index"])] = row
    return rows


def sample_items(first: dict[int, dict], second: dict[int, dict], n_items: int, sample_seed: int) -> list[int]:
    """`n_items` indices answered by both models, drawn with `sample_seed` (all of them if fewer)."""
    common = sorted(set(first) & set(second))
    for index in common:
        a, b = first[index], second[index]
        keys_a = (a.get("instruction"), a.get("input", ""), a.get("prompt"))
        if keys_a != (b.get("instruction"), b.get("input", ""), b.get("prompt")):
            raise ValueError(f"item {index}: the two response files answer different instructions")
    if not common:
        raise ValueError("the two response files share no item index")
    return random.Random(sample_seed).sample(common, min(n_items, len(common)))


def _read_verdicts(path: Path, template_version: str, judge_model: str) -> dict[int, dict]:
    verdicts: dict[int, dict] = {}
    if not path.is_file():
        return verdicts
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s, line %d: skipping an incomplete verdict line", path, number)
            continue
        if row.get("template_version") != template_version or row.get("judge_model") != judge_model:
            raise ValueError(
                f"{path} holds verdicts from {row.get('judge_model')!r} with template {row.get('template_version')!r}; "
                f"this run uses {judge_model!r} with {template_version!r}. Use another output file."
            )
        verdicts[int(row["index"])] = row
    return verdicts


def run_judge(
    first: tuple[str, dict[int, dict]],
    second: tuple[str, dict[int, dict]],
    client: ChatClient,
    out_path: str | Path,
    *,
    n_items: int = 100,
    sample_seed: int = 0,
    order_seed: int = 0,
    max_invalid: int = 3,
    progress: bool = True,
) -> JudgeSummary:
    """Judge `first` vs `second` on sampled items; append each verdict to `out_path`; return win/tie/loss."""
    from tqdm.auto import tqdm

    (name_1, rows_1), (name_2, rows_2) = first, second
    if name_1 == name_2:
        raise ValueError("the two models need different names")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    items = sample_items(rows_1, rows_2, n_items, sample_seed)
    done = _read_verdicts(out_path, TEMPLATE_VERSION, client.model)
    pairs = {tuple(sorted((r["response_a"], r["response_b"]))) for r in done.values()}
    foreign = pairs - {tuple(sorted((name_1, name_2)))}
    if foreign:
        raise ValueError(f"{out_path} holds verdicts for other models {sorted(foreign)}; use another output file")
    todo = [i for i in items if done.get(i, {}).get("verdict") not in ("A", "B", "tie")]
    with out_path.open("a", encoding="utf-8") as handle:
        for index in tqdm(todo, desc=f"judge {name_1} vs {name_2}", disable=not progress, unit="item"):
            swapped = order_is_swapped(order_seed, index)
            a_name, b_name = (name_2, name_1) if swapped else (name_1, name_2)
            a_row, b_row = (rows_2[index], rows_1[index]) if swapped else (rows_1[index], rows_2[index])
            prompt = build_judge_prompt(a_row.get("instruction") or a_row.get("prompt", ""), a_row.get("input", ""),
                                        a_row["response"], b_row["response"])
            raw, verdict, attempts = "", None, 0
            while verdict is None and attempts < max_invalid:
                attempts += 1
                raw = client.complete(prompt)
                verdict = parse_verdict(raw)
            winner = {"A": a_name, "B": b_name, "tie": "tie"}.get(verdict) if verdict else None
            row = {
                "index": index, "template_version": TEMPLATE_VERSION, "judge_model": client.model,
                "sample_seed": sample_seed, "order_seed": order_seed, "swapped": swapped,
                "response_a": a_name, "response_b": b_name, "raw": raw,
                "verdict": verdict or "invalid", "winner": winner, "attempts": attempts,
            }
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            done[index] = row
    return summarize_verdicts([done[i] for i in items if i in done], name_1, name_2)


def summarize_verdicts(rows: Sequence[dict], first: str, second: str) -> JudgeSummary:
    """Count wins/ties/losses of `first` from verdict rows (the last row per item counts)."""
    last = {int(r["index"]): r for r in rows}
    winners = [r.get("winner") for r in last.values()]
    return JudgeSummary(first, second, wins=winners.count(first), ties=winners.count("tie"),
                        losses=winners.count(second), invalid=sum(1 for w in winners if w is None))
