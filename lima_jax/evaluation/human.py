"""Human preference rating, blind: the rater sees "Response 1" and "Response 2" in a random order (fixed
per pair and seed), never which system wrote which, and chooses 1 better / 2 better / neither. Every
choice is written to the judgments file before the next pair is shown; rerunning resumes where it stopped.

Two front ends over the same session: the terminal (`run_terminal`) and a small web page served on
127.0.0.1 only (`serve_web`), for raters who prefer a browser.
"""
from __future__ import annotations

import html
import http.server
import json
import threading
import urllib.parse
from typing import Callable, Sequence

from lima_jax.evaluation.judge import LOCAL_HOSTS
from lima_jax.evaluation.pairs import JudgmentStore, Pair, first_shown, presentation_order

# What the rater may answer, as shown; "1"/"2" name display slots, never systems.
ANSWERS = {"1": "Response 1 is better", "2": "Response 2 is better", "n": "Neither is significantly better"}


class RatingSession:
    """The pairs still to rate, in random order, and the mapping from display slots back to systems."""

    def __init__(self, pairs: Sequence[Pair], store: JudgmentStore, seed: int, rater: str):
        self.pairs = presentation_order(pairs, seed)
        self.by_id = {p.pair_id: p for p in pairs}
        self.store, self.seed, self.rater = store, seed, rater
        store.check(pairs)  # a resumed session must be judging the same answers
        self.lock = threading.Lock()

    @property
    def total(self) -> int:
        return len(self.pairs)

    @property
    def num_done(self) -> int:
        return len(self.store.done & set(self.by_id))

    def next_pair(self) -> Pair | None:
        return next(self.store.pending(self.pairs), None)

    def shown(self, pair: Pair) -> tuple[str, str]:
        """(Response 1 text, Response 2 text)."""
        return (pair.a, pair.b) if first_shown(pair, self.seed) == "a" else (pair.b, pair.a)

    def record(self, pair_id: str, answer: str) -> bool:
        """Saves the rater's answer ("1", "2" or "n") for a pair; False if it was already judged."""
        if answer not in ANSWERS:
            raise ValueError(f"answer {answer!r}: not one of {sorted(ANSWERS)}")
        with self.lock:
            pair = self.by_id.get(pair_id)
            if pair is None:
                raise KeyError(f"unknown pair {pair_id!r}")
            if pair_id in self.store.done:
                return False
            first = first_shown(pair, self.seed)
            second = "b" if first == "a" else "a"
            winner = {"1": first, "2": second, "n": "tie"}[answer]
            self.store.add(pair, winner, mode="human", rater=self.rater, shown_first=first, answer=answer)
            return True


# ------------------------------------------------------------------------------------------ terminal


def _render_text(pair: Pair, session: RatingSession) -> str:
    one, two = session.shown(pair)
    rule = "=" * 78
    return (f"\n{rule}\nPair {session.num_done + 1} of {session.total}\n{rule}\nPROMPT:\n{pair.prompt_text}\n\n"
            f"----- Response 1 -----\n{one}\n\n----- Response 2 -----\n{two}\n{rule}")


def run_terminal(session: RatingSession, read: Callable[[str], str] = input,
                 write: Callable[[str], None] = print) -> int:
    """Asks about every pending pair until done or the rater quits (q, Ctrl-C, Ctrl-D); returns the number of
    judgments made. Nothing is lost on interruption: each one is on disk before the next question."""
    made = 0
    options = "  ".join(f"[{k}] {v}" for k, v in ANSWERS.items()) + "  [q] quit"
    try:
        while (pair := session.next_pair()) is not None:
            write(_render_text(pair, session))
            while True:
                answer = read(f"{options}\n> ").strip().lower()
                if answer == "q":
                    write(f"stopped: {session.num_done} of {session.total} judged; rerun to resume")
                    return made
                if answer in ANSWERS:
                    break
                write(f"please answer one of: {', '.join(ANSWERS)} or q")
            made += session.record(pair.pair_id, answer)
    except (KeyboardInterrupt, EOFError):
        write(f"\ninterrupted: {session.num_done} of {session.total} judged and saved; rerun to resume")
        return made
    write(f"all {session.total} pairs judged")
    return made


# ------------------------------------------------------------------------------------------------ web

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Pairwise rating</title><style>
body{{font-family:sans-serif;margin:1.5em;max-width:90em}} .prompt{{background:#f3f3f3;padding:.7em;white-space:pre-wrap}}
.row{{display:flex;gap:1em}} .resp{{flex:1;border:1px solid #bbb;padding:.7em;white-space:pre-wrap}}
button{{font-size:110%;margin:.5em .5em 0 0}}</style></head><body>
<p>Pair {number} of {total}</p><h3>Prompt</h3><div class="prompt">{prompt}</div>
<div class="row"><div class="resp"><h3>Response 1</h3>{one}</div><div class="resp"><h3>Response 2</h3>{two}</div></div>
<form method="post" action="/judge"><input type="hidden" name="pair_id" value="{pair_id}">{buttons}</form>
</body></html>"""


def _render_page(session: RatingSession) -> str:
    pair = session.next_pair()
    if pair is None:
        return (f"<!doctype html><html><body><h2>All {session.total} pairs judged. Thank you!</h2>"
                "<p>You can close this page.</p></body></html>")
    one, two = session.shown(pair)
    buttons = "".join(f'<button type="submit" name="answer" value="{k}">{html.escape(v)}</button>'
                      for k, v in ANSWERS.items())
    return _PAGE.format(number=session.num_done + 1, total=session.total, prompt=html.escape(pair.prompt_text),
                        one=html.escape(one), two=html.escape(two), pair_id=pair.pair_id, buttons=buttons)


def _state(session: RatingSession) -> dict:
    pair = session.next_pair()
    state = {"done": session.num_done, "total": session.total, "next": None}
    if pair is not None:
        one, two = session.shown(pair)
        state["next"] = {"pair_id": pair.pair_id, "prompt": pair.prompt_text, "response_1": one, "response_2": two}
    return state


def make_handler(session: RatingSession) -> type[http.server.BaseHTTPRequestHandler]:
    """Routes: GET / (the next pair), GET /state.json (progress and the next pair, for scripts),
    POST /judge (form fields pair_id, answer in 1/2/n; redirects to /)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, status: int, body: str, content_type: str = "text/html; charset=utf-8",
                  headers: dict | None = None) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = urllib.parse.urlparse(self.path).path
            if path == "/":
                self._send(200, _render_page(session))
            elif path == "/state.json":
                self._send(200, json.dumps(_state(session)), "application/json")
            else:
                self._send(404, "not found", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            if urllib.parse.urlparse(self.path).path != "/judge":
                return self._send(404, "not found", "text/plain")
            length = int(self.headers.get("Content-Length") or 0)
            if length > 10_000:
                return self._send(413, "request too large", "text/plain")
            form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8"))
            pair_id, answer = form.get("pair_id", [""])[0], form.get("answer", [""])[0]
            try:
                session.record(pair_id, answer)
            except (KeyError, ValueError) as e:
                return self._send(400, f"bad judgment: {e}", "text/plain")
            self._send(303, "", headers={"Location": "/"})

        def log_message(self, format: str, *args) -> None:  # keep the terminal quiet
            pass

    return Handler


def serve_web(session: RatingSession, port: int = 8765, host: str = "127.0.0.1") -> http.server.HTTPServer:
    """An HTTP server for the session bound to localhost (port 0: any free port); call serve_forever()."""
    if host not in LOCAL_HOSTS:
        raise ValueError(f"host={host!r}: the rating page is served on localhost only")
    return http.server.HTTPServer((host, port), make_handler(session))
