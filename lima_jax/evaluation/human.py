"""Human preference rating, blind: the rater sees "Response 1" and "Response 2" in a random order (fixed
per pair and seed), never which system wrote which, and chooses 1 better / 2 better / neither. Every
choice is written to the judgments file before the next pair is shown; rerunning resumes where it stopped.

The display order (which pair comes next, which system's answer is "Response 1") comes from a seed drawn
with `secrets` for each new judgments file and stored with every judgment (`order_seed`), so nobody can
work it out from the public prompts, and a resumed session shows everything as before; an explicit seed
(`--seed`) overrides it for reproducible sessions.

Two front ends over the same session: the terminal (`run_terminal`) and a small web page served on
127.0.0.1 only (`serve_web`), for raters who prefer a browser. The page answers only requests whose `Host`
(and `Origin`, when sent) is the address it is bound to, so another web site the rater has open cannot
reach it by DNS rebinding or post to it; every POST must carry the page's per-session secret token; and
each connection has its own thread (with a time-out), so a slow client blocks nobody.
"""
from __future__ import annotations

import hmac
import html
import http.server
import json
import secrets
import socket
import threading
import urllib.parse
from typing import Callable, Sequence

from lima_jax.evaluation.judge import LOCAL_HOSTS
from lima_jax.evaluation.pairs import JudgmentStore, Pair, first_shown, presentation_order

# What the rater may answer, as shown; "1"/"2" name display slots, never systems.
ANSWERS = {"1": "Response 1 is better", "2": "Response 2 is better", "n": "Neither is significantly better"}


# The judgment field that stores the seed of the display order (see `session_seed`).
ORDER_SEED = "order_seed"


def session_seed(store: JudgmentStore, seed: int | None = None) -> tuple[int, str]:
    """(the display-order seed of a rating session, where it came from): `seed` when given; else the one
    stored with the file's last human judgment; else 0 for a file of human judgments made before seeds were
    stored (0 was the default then, so those sessions resume unchanged); else a new secret one."""
    if seed is not None:
        return seed, "given (--seed)"
    human = [r for r in store.records if r.get("mode") == "human"]
    for record in reversed(human):
        if isinstance(record.get(ORDER_SEED), int) and not isinstance(record.get(ORDER_SEED), bool):
            return record[ORDER_SEED], f"stored in {store.path}"
    if human:
        return 0, f"0, the former default: the human judgments in {store.path} have no stored seed"
    return secrets.randbelow(2**53), "new and random (stored with each judgment)"


class RatingSession:
    """The pairs still to rate, in random order, and the mapping from display slots back to systems.

    `seed` None: the seed stored in the judgments file, or a new random one (`session_seed`)."""

    def __init__(self, pairs: Sequence[Pair], store: JudgmentStore, seed: int | None = None, rater: str = "rater"):
        store.check(pairs)  # a resumed session must be judging the same answers
        self.seed, self.seed_source = session_seed(store, seed)
        self.pairs = presentation_order(pairs, self.seed)
        self.by_id = {p.pair_id: p for p in pairs}
        self.store, self.rater = store, rater
        self.lock = threading.Lock()  # one judgment at a time, whichever thread serves it

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
            self.store.add(pair, winner, mode="human", rater=self.rater, shown_first=first, answer=answer,
                           **{ORDER_SEED: self.seed})
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
<form method="post" action="/judge"><input type="hidden" name="pair_id" value="{pair_id}">
<input type="hidden" name="token" value="{token}">{buttons}</form>
</body></html>"""

# Seconds a connection may stay silent before the server drops it (its own thread waits, nobody else).
REQUEST_TIMEOUT_S = 30.0
MAX_BODY_BYTES = 10_000
# Sent with every answer: no other page may frame this one (a click on it would be the other page's).
_SECURITY_HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                     "Content-Security-Policy": "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff",
                     "Referrer-Policy": "no-referrer"}


def _render_page(session: RatingSession, token: str = "") -> str:
    pair = session.next_pair()
    if pair is None:
        return (f"<!doctype html><html><body><h2>All {session.total} pairs judged. Thank you!</h2>"
                "<p>You can close this page.</p></body></html>")
    one, two = session.shown(pair)
    buttons = "".join(f'<button type="submit" name="answer" value="{k}">{html.escape(v)}</button>'
                      for k, v in ANSWERS.items())
    return _PAGE.format(number=session.num_done + 1, total=session.total, prompt=html.escape(pair.prompt_text),
                        one=html.escape(one), two=html.escape(two), pair_id=pair.pair_id,
                        token=html.escape(token), buttons=buttons)


def _state(session: RatingSession, token: str = "") -> dict:
    pair = session.next_pair()
    state = {"done": session.num_done, "total": session.total, "next": None, "token": token}
    if pair is not None:
        one, two = session.shown(pair)
        state["next"] = {"pair_id": pair.pair_id, "prompt": pair.prompt_text, "response_1": one, "response_2": two}
    return state


def _authorities(host: str, port: int) -> frozenset[str]:
    """The `Host` header values a browser sends for the bound address (localhost names only)."""
    names = {"127.0.0.1", "localhost"} if host in ("127.0.0.1", "localhost") else {"[::1]", "localhost"}
    return frozenset({f"{n}:{port}" for n in names} | (names if port == 80 else set()))


def make_handler(session: RatingSession, token: str, allowed_hosts: frozenset[str],
                 ) -> type[http.server.BaseHTTPRequestHandler]:
    """Routes: GET / (the next pair), GET /state.json (progress, the next pair and the token, for scripts),
    POST /judge (form fields pair_id, answer in 1/2/n and token; redirects to /).

    Every request must name one of `allowed_hosts` as its `Host`, and its `Origin`, when sent, must be
    `http://` + one of them: anything else is 403 (DNS rebinding, another site posting). A POST without the
    session's `token` is 403 too, and records nothing."""
    allowed_origins = frozenset(f"http://{h}" for h in allowed_hosts)
    expected_token = token.encode("utf-8")

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # a silent client is dropped after this long (its own thread waits)

        def _send(self, status: int, body: str, content_type: str = "text/html; charset=utf-8",
                  headers: dict | None = None) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in {**_SECURITY_HEADERS, **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _refused(self) -> bool:
            """Sends 403 (and returns True) unless Host and Origin name the bound address."""
            host = (self.headers.get("Host") or "").strip().lower()
            origin = self.headers.get("Origin")
            if host not in allowed_hosts:
                self._send(403, f"forbidden: Host {host!r} is not this rating page's address", "text/plain")
                return True
            if origin is not None and origin.strip().lower() not in allowed_origins:
                self._send(403, f"forbidden: requests from {origin!r} are not accepted", "text/plain")
                return True
            return False

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self._refused():
                return
            path = urllib.parse.urlparse(self.path).path
            if path == "/":
                with session.lock:
                    page = _render_page(session, token)
                self._send(200, page)
            elif path == "/state.json":
                with session.lock:
                    state = _state(session, token)
                self._send(200, json.dumps(state), "application/json")
            else:
                self._send(404, "not found", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            if self._refused():
                return
            if urllib.parse.urlparse(self.path).path != "/judge":
                return self._send(404, "not found", "text/plain")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True
                return self._send(413 if length > MAX_BODY_BYTES else 400, "bad or too large request", "text/plain")
            try:
                form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8"))
            except UnicodeDecodeError:  # (a client too slow to send its body times out in http.server)
                return self._send(400, "bad request: not UTF-8", "text/plain")
            given = form.get("token", [""])[0].encode("utf-8")
            if not hmac.compare_digest(given, expected_token):
                return self._send(403, "forbidden: missing or wrong token; reload the rating page", "text/plain")
            pair_id, answer = form.get("pair_id", [""])[0], form.get("answer", [""])[0]
            try:
                session.record(pair_id, answer)
            except (KeyError, ValueError) as e:
                return self._send(400, f"bad judgment: {e}", "text/plain")
            self._send(303, "", headers={"Location": "/"})

        def log_message(self, format: str, *args) -> None:  # keep the terminal quiet
            pass

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a connection still open never keeps the process alive
    token: str = ""


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve_web(session: RatingSession, port: int = 8765, host: str = "127.0.0.1",
              token: str | None = None) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server for the session bound to localhost (port 0: any free port); call
    serve_forever(). `server.token` is the session's secret (new and random unless given), which the page
    embeds and every POST must carry."""
    if host not in LOCAL_HOSTS:
        raise ValueError(f"host={host!r}: the rating page is served on localhost only")
    token = token or secrets.token_urlsafe(32)
    address = "::1" if host == "::1" else "127.0.0.1"  # "localhost" binds the IPv4 loopback
    server_class = _Server6 if address == "::1" else _Server
    server = server_class((address, port), http.server.BaseHTTPRequestHandler)  # bound: the port is known now
    server.RequestHandlerClass = make_handler(session, token, _authorities(host, server.server_address[1]))
    server.token = token
    return server
