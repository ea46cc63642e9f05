"""Model-judged pairwise preference: every pair is judged twice, once in each order, and a disagreement
between the two verdicts counts as a tie (which cancels the judge's position bias).

The judge is either an OpenAI-compatible chat endpoint on *localhost* (a local vLLM / llama.cpp / TGI
server; nothing else is ever contacted: proxy settings are ignored and redirects refused) or a lima_jax
model decoding greedily (`LimaJaxJudge`: the caller builds the generator, e.g. `lima_jax.eval` with
`lima_jax.generation.build_generator`, so this package needs no model code). The judge prompt is a text
file (local or gs://) with the placeholders {question}, {response_1} and {response_2}; the judge must end
its answer with [[1]], [[2]] or [[N]] (neither). Verdicts that cannot be read count as ties and are
flagged `unparsed`.
"""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Protocol, Sequence

from etils import epath

from lima_jax.errors import ConfigError, DataError, LimaError
from lima_jax.evaluation.pairs import JudgmentStore, Pair
from lima_jax.paths import PathLike, as_path

DEFAULT_PROMPT = epath.Path(__file__).resolve().parent.parent / "prompts" / "judge_pairwise.txt"
PLACEHOLDERS = ("{question}", "{response_1}", "{response_2}")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_VERDICT = re.compile(r"\[\[\s*(1|2|n|neither|tie)\s*\]\]", re.IGNORECASE)


class Judge(Protocol):
    name: str

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """The judge's text answer to each prompt."""


class JudgeError(LimaError, RuntimeError):
    """The judge endpoint failed or answered something that is not a chat completion; the message names
    the URL (`lima_jax.cli.run` prints it as one `error:` paragraph, exit status 2)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()
        raise JudgeError(f"{req.full_url}: answered {code} {msg}, a redirect to {newurl}; the judge endpoint must "
                         "answer itself (redirects are not followed: only localhost is ever contacted)")


# Direct connections only: no http(s)_proxy from the environment, no redirects (both could leave localhost).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def load_template(path: PathLike = DEFAULT_PROMPT) -> str:
    """The judge prompt template; it must contain each placeholder (else DataError naming the file)."""
    path = as_path(path)
    if not path.is_file():
        raise DataError(f"{path}: judge prompt file not found (--judge_prompt)")
    text = path.read_text(encoding="utf-8")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise DataError(f"{path}: the judge prompt lacks the placeholder(s) {', '.join(missing)}")
    return text


def fill(template: str, question: str, response_1: str, response_2: str) -> str:
    """Substitutes the placeholders literally and in one pass: braces in the answers, even a placeholder,
    stay as they are."""
    values = {"question": question, "response_1": response_1, "response_2": response_2}
    return re.sub(r"\{(question|response_1|response_2)\}", lambda m: values[m.group(1)], template)


def parse_verdict(text: str) -> str | None:
    """"1", "2" or "N" from the judge's last [[...]] mark, or None if it has none."""
    marks = _VERDICT.findall(text or "")
    if not marks:
        return None
    last = marks[-1].lower()
    return last if last in ("1", "2") else "N"


def check_local_url(url: str) -> str:
    """The URL without a trailing slash, if it is http(s) on localhost; ConfigError otherwise."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in LOCAL_HOSTS:
        raise ConfigError(f"--judge_url {url!r}: only http(s) endpoints on localhost ({', '.join(LOCAL_HOSTS)}) "
                         "are allowed")
    return url.rstrip("/")


class HttpJudge:
    """A model behind an OpenAI-compatible `/chat/completions` endpoint on localhost, temperature 0."""

    def __init__(self, url: str, model: str, max_tokens: int = 1024, timeout_s: float = 300.0,
                 attempts: int = 3):
        self.url = check_local_url(url)
        self.model = model
        self.name = f"{model} @ {self.url}"
        self.max_tokens, self.timeout_s, self.attempts = max_tokens, timeout_s, attempts

    def _post(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0, "max_tokens": self.max_tokens}).encode("utf-8")
        request = urllib.request.Request(f"{self.url}/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with _OPENER.open(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read().decode("utf-8"))
        try:
            return payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url}/chat/completions: not a chat completion: {str(payload)[:200]}") from None

    def complete(self, prompts: Sequence[str]) -> list[str]:
        answers = []
        for prompt in prompts:
            for attempt in range(1, self.attempts + 1):
                try:
                    answers.append(self._post(prompt))
                    break
                except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                    if attempt == self.attempts:
                        raise JudgeError(f"{self.url}/chat/completions failed {attempt} times: {e}") from e
                    time.sleep(min(2.0 ** attempt, 10.0))
        return answers


class LimaJaxJudge:
    """A lima_jax model as the judge: each judge prompt is one user turn, answered with `settings`.

    `generator` is a `lima_jax.generation.Generator` (anything with `.tokenizer` and
    `.generate_ids(ids, settings)` returning completions with `.text`) and `settings` its sampling settings,
    greedy for a judge, e.g. `SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=512)`.
    Both come from the caller, so the evaluation package imports no generation code."""

    def __init__(self, generator: Any, settings: Any, name: str = "lima_jax judge"):
        self.generator = generator
        self.settings = settings
        self.name = name

    def complete(self, prompts: Sequence[str]) -> list[str]:
        ids = [self.generator.tokenizer.encode_dialog([p]).ids for p in prompts]
        return [c.text for c in self.generator.generate_ids(ids, self.settings)]


def _to_system(verdict: str | None, first: str) -> str:
    """A verdict about display slots ("1"/"2"/"N") as a winner among systems ("a"/"b"/"tie")."""
    second = "b" if first == "a" else "a"
    return {"1": first, "2": second}.get(verdict or "N", "tie")


def judge_pairs(pairs: Sequence[Pair], store: JudgmentStore, judge: Judge, template: str,
                chunk: int = 8, log=print) -> int:
    """Judges every pending pair in both orders and saves each result as soon as its pair is done.

    Returns the number of pairs judged now. The final winner is the common verdict when both orders agree
    and "tie" when they disagree.
    """
    store.check(pairs)  # a resumed session must be judging the same answers
    pending = list(store.pending(pairs))
    for start in range(0, len(pending), chunk):
        batch = pending[start:start + chunk]
        prompts = []
        for pair in batch:
            prompts += [fill(template, pair.prompt_text, pair.a, pair.b), fill(template, pair.prompt_text, pair.b, pair.a)]
        answers = judge.complete(prompts)
        for i, pair in enumerate(batch):
            raw = answers[2 * i:2 * i + 2]
            verdicts = [parse_verdict(text) for text in raw]
            systems = [_to_system(verdicts[0], "a"), _to_system(verdicts[1], "b")]
            winner = systems[0] if systems[0] == systems[1] else "tie"
            store.add(pair, winner, mode="judge", rater=judge.name, disagreement=systems[0] != systems[1],
                      unparsed=sum(v is None for v in verdicts),
                      verdicts=[{"order": order, "verdict": v, "winner": s, "answer": text}
                                for order, v, s, text in zip(("ab", "ba"), verdicts, systems, raw)])
        log(f"judged {len(store.done)} of {len(pairs)} pairs")
    return len(pending)
