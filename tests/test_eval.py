"""Pairwise preference evaluation: pairing, the model judge (fake local server), human sessions, statistics."""
import builtins
import hashlib
import io
import json
import pathlib
import re
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lima_jax import cli as lima_cli
from lima_jax import eval as eval_cli
from lima_jax import records
from lima_jax.errors import ConfigError, DataError, LimaError
from lima_jax.evaluation import human, judge, pairs, stats

# Prompt -> (A's answer, B's answer). "GOOD" marks the answer the fake judge prefers.
ANSWERS = {
    "p1": ("GOOD answer one", "meh one"),
    "p2": ("meh two", "GOOD answer two"),
    "p3": ("plain three", "plain three too"),  # the fake judge always says [[1]]: orders disagree -> tie
    "p4": ("GOOD four", "also GOOD four"),  # both GOOD: the fake judge says [[N]] in both orders -> tie
    "p5": ("odd five", "weird five"),  # the fake judge answers without a verdict -> unparsed -> tie
}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def response_files(tmp_path):
    a = _write(tmp_path / "lima.jsonl", [{"input": [p], "response": x} for p, (x, _) in ANSWERS.items()])
    # B lists the prompts in another order and in the plain `prompt` schema.
    b = _write(tmp_path / "base.jsonl", [{"prompt": p, "response": y} for p, (_, y) in reversed(ANSWERS.items())])
    return a, b


def test_pairs_match_prompts_across_orders_and_schemas(response_files):
    found = pairs.make_pairs(*response_files)
    assert [(p.prompt, p.a, p.b) for p in found] == [((k,), x, y) for k, (x, y) in ANSWERS.items()]


def test_lima_jax_answer_files_pair_with_other_systems_prompt_files(tmp_path):
    """`pairs` reads answer records by the field names of `lima_jax.records`; another system's file may
    give the prompt as `prompt` (a string, or a conversation ending with the user) instead of `input`."""
    assert set(pairs.READ_FIELDS) <= set(records.ANSWER_FIELDS)
    single = records.PromptRecord("1", ("Hi",), (), "q.jsonl:1", {})
    mt = records.PromptRecord("2", ("Q1",), ("Q2",), "q.jsonl:2", {"category": "writing"})
    ours = _write(tmp_path / "ours.jsonl", [
        records.answer_record(single, ["Hi"], ["Hello!"], 3, 2, "eot"),
        records.answer_record(mt, ["Q1", "A1", "Q2"], ["A1", "A2"], 9, 2, "eot")])
    theirs = _write(tmp_path / "theirs.jsonl", [{"prompt": ["Q1", "their A1", "Q2"], "responses": ["B1", "B2"]},
                                                {"prompt": "Hi", "response": "Hey."}])
    found = pairs.make_pairs(ours, theirs)
    assert [(p.prompt, p.a, p.b) for p in found] == [
        (("Hi",), "Hello!", "Hey."), (("Q1", "Q2"), "[answer 1] A1\n\n[answer 2] A2", "[answer 1] B1\n\n[answer 2] B2")]


def test_unmatched_or_duplicate_prompts_fail_with_file_and_line(tmp_path, response_files):
    a, _ = response_files
    b = _write(tmp_path / "other.jsonl", [{"prompt": "p1", "response": "x"}, {"prompt": "p9", "response": "y"}])
    with pytest.raises(DataError, match=r"lima.jsonl:2: this prompt has no answer in .*other.jsonl"):
        pairs.make_pairs(a, b)
    dup = _write(tmp_path / "dup.jsonl", [{"prompt": "p1", "response": "x"}, {"prompt": "p1", "response": "y"}])
    with pytest.raises(DataError, match=r"dup.jsonl:2: the same prompt as .*dup.jsonl:1"):
        pairs.read_responses(dup)
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p1", "response": 3}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'response' must be a string"):
        pairs.read_responses(bad)


# ------------------------------------------------------------------------------------------- judge


class FakeJudge:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 with a fixed policy; records every request. With
    `redirect` set, /v1/chat/completions answers 302 to that path (which then answers normally)."""

    def __init__(self, redirect=None):
        self.requests = []
        self.paths = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                fake.paths.append(self.path)
                if redirect and self.path == "/v1/chat/completions":
                    self.send_response(302)
                    self.send_header("Location", redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                assert self.path in ("/v1/chat/completions", redirect)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                data = json.dumps({"choices": [{"message": {"role": "assistant",
                                                            "content": fake.policy(body)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def policy(body):
        text = body["messages"][0]["content"]
        one = text.split("[Response 1]")[1].split("[Response 2]")[0]
        two = text.split("[Response 2]")[1]
        if "odd" in one or "odd" in two:
            return "I cannot decide."
        if "GOOD" in one and "GOOD" in two:
            return "Both fine.\n[[N]]"
        if "GOOD" in one:
            return "Reasoning...\n[[1]]"
        if "GOOD" in two:
            return "Reasoning...\n[[2]]"
        return "The first one, always.\n[[1]]"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_judge():
    server = FakeJudge()
    yield server
    server.close()


def test_judge_runs_both_orders_and_maps_disagreements_to_ties(response_files, tmp_path, fake_judge):
    out = tmp_path / "judge.jsonl"
    eval_cli.main(["pairwise", "--a", str(response_files[0]), "--b", str(response_files[1]), "--judgments",
                   str(out), "--mode", "judge", "--judge_url", fake_judge.url, "--judge_model", "fake",
                   "--judge_timeout_s", "20", "--chunk", "2"])
    assert len(fake_judge.requests) == 2 * len(ANSWERS)
    assert all(r["model"] == "fake" and r["temperature"] == 0.0 for r in fake_judge.requests)
    shown = [(r["messages"][0]["content"].split("[Response 1]\n")[1].split("\n")[0]) for r in fake_judge.requests]
    for a_text, b_text in ANSWERS.values():  # every pair judged once with A first and once with B first
        assert shown.count(a_text) == 1 and shown.count(b_text) == 1
    records = {r["prompt"][0]: r for r in pairs.read_judgments(out)}
    assert {k: r["winner"] for k, r in records.items()} == {"p1": "a", "p2": "b", "p3": "tie", "p4": "tie",
                                                            "p5": "tie"}
    assert records["p3"]["disagreement"] and not records["p4"]["disagreement"]
    assert [v["winner"] for v in records["p3"]["verdicts"]] == ["a", "b"]
    assert records["p5"]["unparsed"] == 2
    # Resuming judges nothing twice.
    eval_cli.main(["pairwise", "--a", str(response_files[0]), "--b", str(response_files[1]), "--judgments",
                   str(out), "--mode", "judge", "--judge_url", fake_judge.url, "--judge_model", "fake"])
    assert len(fake_judge.requests) == 2 * len(ANSWERS)


def test_judge_refuses_endpoints_off_localhost_and_bad_templates(tmp_path):
    for url in ("http://example.com/v1", "http://10.0.0.1:8000/v1", "file:///etc/passwd"):
        with pytest.raises(ValueError, match="only http"):
            judge.HttpJudge(url, "m")
    template = tmp_path / "t.txt"
    template.write_text("Q: {question}\n1: {response_1}\n")
    with pytest.raises(ValueError, match=r"t.txt: the judge prompt lacks the placeholder\(s\) \{response_2\}"):
        judge.load_template(template)
    assert judge.load_template() and judge.fill("{question}|{response_1}|{response_2}", "{x}", "a", "b") == "{x}|a|b"


def test_fill_keeps_placeholders_inside_the_answers_verbatim():
    question, one, two = "Q? {response_1}", "A quotes {response_2} and {question}", "B {response_1}"
    filled = judge.fill("[{question}] [{response_1}] [{response_2}]", question, one, two)
    assert filled == f"[{question}] [{one}] [{two}]"


def test_judge_connects_directly_despite_a_proxy_in_the_environment(fake_judge, monkeypatch):
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a closed port: a request sent there fails
    # A fresh process, so the proxy is in the environment from the start, as in a user's shell.
    code = ("import sys; from lima_jax.evaluation import judge; print(judge.HttpJudge(sys.argv[1], 'fake', "
            "timeout_s=20, attempts=1).complete(['[Response 1]GOOD[Response 2]meh'])[0])")
    result = subprocess.run([sys.executable, "-c", code, fake_judge.url], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Reasoning...\n[[1]]\n" and len(fake_judge.requests) == 1


def test_judge_refuses_redirects():
    server = FakeJudge(redirect="/elsewhere/chat/completions")  # answers normally there, if ever reached
    try:
        with pytest.raises(judge.JudgeError, match=r"/v1/chat/completions: answered 302 .* redirect to "
                                                   r"http://127.0.0.1:\d+/elsewhere/chat/completions"):
            judge.HttpJudge(server.url, "fake", timeout_s=20).complete(["[Response 1]\nx\n[Response 2]\ny"])
    finally:
        server.close()
    assert server.paths == ["/v1/chat/completions"]  # asked once (no retry), the redirect not followed


def test_a_failing_judge_is_one_error_paragraph_with_status_2(response_files, tmp_path, capsys):
    assert issubclass(judge.JudgeError, LimaError) and issubclass(judge.JudgeError, RuntimeError)
    server = FakeJudge(redirect="/elsewhere/chat/completions")
    try:
        with pytest.raises(SystemExit) as exit_info:
            lima_cli.run(eval_cli.main, ["pairwise", "--a", str(response_files[0]), "--b", str(response_files[1]),
                                         "--judgments", str(tmp_path / "j.jsonl"), "--mode", "judge",
                                         "--judge_url", server.url, "--judge_model", "fake"])
    finally:
        server.close()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: http://127.0.0.1:") and "redirect" in err and "Traceback" not in err


def test_verdict_parsing_takes_the_last_mark():
    assert judge.parse_verdict("maybe [[1]] ... no, [[2]]") == "2"
    assert judge.parse_verdict("[[ N ]]") == "N" and judge.parse_verdict("[[tie]]") == "N"
    assert judge.parse_verdict("Response 1") is None


# ------------------------------------------------------------------------------------------- human


def _scripted(answers):
    """A `read` function that answers from a list, then is interrupted like Ctrl-C."""
    queue = list(answers)

    def read(_prompt):
        if not queue:
            raise KeyboardInterrupt
        return queue.pop(0)
    return read


def test_terminal_session_interrupted_and_resumed_keeps_every_judgment(response_files, tmp_path):
    all_pairs = pairs.make_pairs(*response_files)
    path = tmp_path / "me.jsonl"
    shown = []
    with pairs.JudgmentStore(path, "lima", "base") as store:
        session = human.RatingSession(all_pairs, store, seed=3, rater="me")
        made = human.run_terminal(session, _scripted(["x", "1", "2"]), shown.append)  # "x" is asked again
    assert made == 2
    first_lines = path.read_text().splitlines()
    assert len(first_lines) == 2
    with pairs.JudgmentStore(path, "lima", "base") as store:
        session = human.RatingSession(all_pairs, store, seed=3, rater="me")
        assert session.num_done == 2
        assert human.run_terminal(session, _scripted(["n", "1", "q"]), shown.append) == 2
    with pairs.JudgmentStore(path, "lima", "base") as store:
        session = human.RatingSession(all_pairs, store, seed=3, rater="me")
        assert human.run_terminal(session, _scripted(["2"]), shown.append) == 1
    lines = path.read_text().splitlines()
    assert lines[:2] == first_lines and len(lines) == len(ANSWERS)
    records = [json.loads(line) for line in lines]
    assert len({r["pair_id"] for r in records}) == len(ANSWERS)
    by_id = {p.pair_id: p for p in all_pairs}
    for r in records:  # the answers judged: A's then B's, whichever was shown first
        pair = by_id[r["pair_id"]]
        assert r["answers_sha"] == hashlib.sha1(f"{pair.a}\0{pair.b}".encode()).hexdigest()
    for r in records:  # the displayed slot maps back to the right system
        second = "b" if r["shown_first"] == "a" else "a"
        assert r["winner"] == {"1": r["shown_first"], "2": second, "n": "tie"}[r["answer"]]
    assert {r["shown_first"] for r in records} == {"a", "b"}  # the order is randomized
    transcript = "\n".join(shown)
    assert "lima" not in transcript and "base" not in transcript  # blind
    assert "interrupted" in transcript and "all 5 pairs judged" in transcript


def test_truncated_last_line_is_dropped_and_other_systems_are_refused(response_files, tmp_path):
    all_pairs = pairs.make_pairs(*response_files)
    path = tmp_path / "me.jsonl"
    with pairs.JudgmentStore(path, "lima", "base") as store:
        store.add(all_pairs[0], "a")
    with path.open("a") as f:
        f.write('{"pair_id": "abc", "win')  # a crash in the middle of a write
    with pairs.JudgmentStore(path, "lima", "base") as store:
        assert store.done == {all_pairs[0].pair_id}
        store.add(all_pairs[1], "tie")
    assert [json.loads(line)["winner"] for line in path.read_text().splitlines()] == ["a", "tie"]
    with pytest.raises(DataError, match=r"me.jsonl:1: judges 'lima' vs 'base', not 'x' vs 'y'"):
        pairs.JudgmentStore(path, "x", "y")


def test_partial_last_line_is_cut_off_and_complete_lines_are_never_rewritten(response_files, tmp_path,
                                                                              monkeypatch):
    all_pairs = pairs.make_pairs(*response_files)
    path = tmp_path / "me.jsonl"
    with pairs.JudgmentStore(path, "lima", "base") as store:
        for pair, winner in zip(all_pairs, ("a", "b", "tie")):
            store.add(pair, winner)
    complete = path.read_bytes()
    path.write_bytes(complete + '{"pair_id": "abc", "prompt": ["é'.encode()[:-1])  # cut mid-character
    real_open = io.open

    def crash_on_rewrite(file, mode="r", *args, **kwargs):  # opening to rewrite empties the file: a crash then
        handle = real_open(file, mode, *args, **kwargs)  # would lose every judgment
        if "w" in mode:
            handle.close()
            raise OSError("simulated crash while rewriting the judgments file")
        return handle
    monkeypatch.setattr(io, "open", crash_on_rewrite)
    monkeypatch.setattr(builtins, "open", crash_on_rewrite)
    store = pairs.JudgmentStore(path, "lima", "base")
    store.close()
    monkeypatch.undo()
    assert path.read_bytes() == complete  # the same bytes: only the partial line is gone
    assert store.done == {p.pair_id for p in all_pairs[:3]}


def test_resuming_on_regenerated_answers_is_refused(response_files, tmp_path):
    a, b = response_files
    path = tmp_path / "judgments.jsonl"
    with pairs.JudgmentStore(path, "lima", "base") as store:
        session = human.RatingSession(pairs.make_pairs(a, b), store, seed=3, rater="me")
        human.run_terminal(session, _scripted(["1", "2", "n"]), lambda _: None)
    judged = [json.loads(line)["prompt"][0] for line in path.read_text().splitlines()]
    changed = judged[1]  # B's answer to the second judged prompt is regenerated
    _write(b, [{"prompt": p, "response": y + " (new)" if p == changed else y} for p, (_, y) in ANSWERS.items()])
    regenerated = pairs.make_pairs(a, b)
    with pairs.JudgmentStore(path, "lima", "base") as store:
        with pytest.raises(DataError, match=r"judgments.jsonl:2: this pair was judged on different answers .*"
                                            r"use a new --judgments file"):
            human.RatingSession(regenerated, store, seed=3, rater="me")
        with pytest.raises(DataError, match=r"judgments.jsonl:2: this pair was judged on different answers"):
            judge.judge_pairs(regenerated, store, None, "{question}{response_1}{response_2}")  # judge not asked
    with pairs.JudgmentStore(path, "lima", "base") as store:  # the unchanged pairs still resume
        human.RatingSession([p for p in regenerated if p.prompt[0] != changed], store, seed=3, rater="me")


def test_read_judgments_refuses_a_pair_judged_twice_by_the_same_rater(tmp_path):
    judgment = {"pair_id": "p1", "a_name": "A", "b_name": "B", "winner": "a", "rater": "me"}
    two_raters = _write(tmp_path / "two.jsonl", [judgment, {**judgment, "rater": "you", "winner": "b"}])
    assert len(pairs.read_judgments(two_raters)) == 2
    twice = _write(tmp_path / "twice.jsonl", [judgment, {**judgment, "pair_id": "p2"}, {**judgment, "winner": "b"}])
    with pytest.raises(DataError, match=r"twice.jsonl:3: pair_id 'p1' is judged twice by the same rater "
                                        r"\(also at .*twice.jsonl:1\)"):
        pairs.read_judgments(twice)


def _serve(session):
    server = human.serve_web(session, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _post(base, pair_id, answer, token):
    data = urllib.parse.urlencode({"pair_id": pair_id, "answer": answer, "token": token}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{base}/judge", data=data), timeout=10) as r:
        return r.status, r.read().decode()  # urllib follows the 303 to the next page


def _state(base):
    with urllib.request.urlopen(f"{base}/state.json", timeout=10) as r:
        return json.loads(r.read())


def test_web_session_over_http_is_blind_saved_and_resumable(response_files, tmp_path):
    all_pairs = pairs.make_pairs(*response_files)
    by_id = {p.pair_id: p for p in all_pairs}
    path = tmp_path / "web.jsonl"
    answers = ["1", "2", "n", "1", "2"]
    expected = {}
    for stop_after in (2, len(ANSWERS)):  # a first session stopped after two, then a resumed one
        with pairs.JudgmentStore(path, "lima", "base") as store:
            session = human.RatingSession(all_pairs, store, seed=5, rater="web")
            server, base = _serve(session)
            try:
                with urllib.request.urlopen(base + "/", timeout=10) as r:
                    page = r.read().decode()
                while (state := _state(base))["done"] < stop_after:
                    nxt = state["next"]
                    assert nxt["prompt"] in page and "lima" not in page and "base" not in page
                    pair = by_id[nxt["pair_id"]]
                    answer = answers[state["done"]]
                    chosen = {"1": nxt["response_1"], "2": nxt["response_2"]}.get(answer)
                    expected[pair.pair_id] = "tie" if chosen is None else "a" if chosen == pair.a else "b"
                    assert f'name="token" value="{server.token}"' in page  # the page carries the token
                    status, page = _post(base, nxt["pair_id"], answer, server.token)
                    assert status == 200
                    assert len(path.read_text().splitlines()) == state["done"] + 1  # on disk at once
                assert _post(base, all_pairs[0].pair_id, "1", server.token)[0] == 200  # a repeat is ignored
                with pytest.raises(urllib.error.HTTPError, match="400"):
                    _post(base, all_pairs[0].pair_id, "maybe", server.token)
            finally:
                server.shutdown()
                server.server_close()
    assert _state_done_page(path, all_pairs)
    records = pairs.read_judgments(path)
    assert {r["pair_id"]: r["winner"] for r in records} == expected and len(records) == len(ANSWERS)


def _state_done_page(path, all_pairs):
    with pairs.JudgmentStore(path, "lima", "base") as store:
        session = human.RatingSession(all_pairs, store, seed=5, rater="web")
        return session.next_pair() is None and "All 5 pairs judged" in human._render_page(session)


def _request(server, method, path="/", body=None, headers=None):
    """(status, body) of one request with exactly these headers (Host included), on 127.0.0.1 only."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        all_headers = {"Host": f"127.0.0.1:{server.server_address[1]}", **(headers or {})}
        if body is not None:
            body = urllib.parse.urlencode(body).encode()
            all_headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)  # no Host unless given
        for k, v in all_headers.items():
            if v is not None:
                conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.fixture
def web(response_files, tmp_path):
    """A rating page on a free port of 127.0.0.1 over a fresh judgments file: (server, session, path)."""
    path = tmp_path / "web.jsonl"
    store = pairs.JudgmentStore(path, "lima", "base")
    session = human.RatingSession(pairs.make_pairs(*response_files), store, rater="web")
    server, _ = _serve(session)
    yield server, session, path
    server.shutdown()
    server.server_close()
    store.close()


def test_web_post_without_the_right_token_is_403_and_records_nothing(web):
    server, session, path = web
    pair_id = session.next_pair().pair_id
    for form in ({"pair_id": pair_id, "answer": "1"}, {"pair_id": pair_id, "answer": "1", "token": ""},
                 {"pair_id": pair_id, "answer": "1", "token": server.token[:-1] + "x"}):
        status, body = _request(server, "POST", "/judge", form)
        assert status == 403 and "token" in body
    assert path.read_bytes() == b"" and session.num_done == 0
    other = human.serve_web(session, port=0)
    other.server_close()
    assert len(server.token) >= 40 and server.token != other.token  # a new secret per server
    status, _ = _request(server, "POST", "/judge", {"pair_id": pair_id, "answer": "1", "token": server.token},
                         {"Origin": f"http://127.0.0.1:{server.server_address[1]}"})
    assert status == 303 and [r["pair_id"] for r in pairs.read_judgments(path)] == [pair_id]  # recorded


def test_web_refuses_a_foreign_origin_even_with_the_token(web):
    server, session, path = web
    form = {"pair_id": session.next_pair().pair_id, "answer": "2", "token": server.token}
    port = server.server_address[1]
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", f"https://127.0.0.1:{port}",
                   f"http://127.0.0.1:{port + 1}"):
        status, body = _request(server, "POST", "/judge", form, {"Origin": origin})
        assert status == 403 and repr(origin) in body, origin
        assert _request(server, "GET", "/state.json", headers={"Origin": origin})[0] == 403
    assert path.read_bytes() == b""
    assert _request(server, "POST", "/judge", form, {"Origin": f"http://localhost:{port}",
                                                    "Host": f"localhost:{port}"})[0] == 303
    assert session.num_done == 1


def test_web_refuses_a_wrong_host_header(web):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    server, session, path = web
    port = server.server_address[1]
    form = {"pair_id": session.next_pair().pair_id, "answer": "1", "token": server.token}
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1", None):
        for method, route in (("GET", "/"), ("GET", "/state.json")):
            status, body = _request(server, method, route, headers={"Host": host})
            assert status == 403 and session.next_pair().prompt_text not in body and server.token not in body
        assert _request(server, "POST", "/judge", form, {"Host": host})[0] == 403
    assert path.read_bytes() == b""
    status, page = _request(server, "GET", "/")
    assert status == 200 and session.next_pair().prompt_text in page and server.token in page


def test_a_slow_client_does_not_block_the_rating_page(web):
    """One client connects and sends nothing, another sends half a POST: a third request is still served."""
    import socket
    import time
    server, session, path = web
    address = ("127.0.0.1", server.server_address[1])
    silent = socket.create_connection(address, timeout=10)
    half = socket.create_connection(address, timeout=10)
    try:
        half.sendall(f"POST /judge HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nContent-Length: 500\r\n\r\n"
                     "pair_id=".encode())
        time.sleep(0.2)  # both are being served (each in its own thread), waiting for bytes that never come
        start = time.monotonic()
        status, state = _request(server, "GET", "/state.json")
        assert status == 200 and json.loads(state)["total"] == len(ANSWERS)
        form = {"pair_id": session.next_pair().pair_id, "answer": "n", "token": server.token}
        assert _request(server, "POST", "/judge", form)[0] == 303
        assert time.monotonic() - start < 5 and session.num_done == 1
    finally:
        silent.close()
        half.close()
    assert human.REQUEST_TIMEOUT_S <= 60  # and a silent connection is dropped after that


def test_the_display_order_seed_is_secret_stored_and_reused_on_resume(response_files, tmp_path):
    all_pairs = pairs.make_pairs(*response_files)
    path = tmp_path / "me.jsonl"
    with pairs.JudgmentStore(path, "lima", "base") as store:
        first = human.RatingSession(all_pairs, store, rater="me")
        order = [p.pair_id for p in first.pairs]
        shown = {p.pair_id: first.shown(p) for p in all_pairs}
        human.run_terminal(first, _scripted(["1", "2"]), lambda _: None)
    assert "new and random" in first.seed_source
    assert [json.loads(line)["order_seed"] for line in path.read_text().splitlines()] == [first.seed] * 2
    with pairs.JudgmentStore(path, "lima", "base") as store:  # resumed: the same order, the same sides
        resumed = human.RatingSession(all_pairs, store, rater="me")
        assert resumed.seed == first.seed and f"stored in {path}" in resumed.seed_source
        assert [p.pair_id for p in resumed.pairs] == order and {p.pair_id: resumed.shown(p) for p in all_pairs} == shown
        assert resumed.next_pair().pair_id == order[2]
        explicit = human.RatingSession(all_pairs, store, 11, "me")  # --seed still overrides
        assert explicit.seed == 11 and [p.pair_id for p in explicit.pairs] == [
            p.pair_id for p in pairs.presentation_order(all_pairs, 11)]
    seeds = set()
    for i in range(3):  # fresh files get fresh seeds
        with pairs.JudgmentStore(tmp_path / f"fresh{i}.jsonl", "lima", "base") as store:
            seeds.add(human.RatingSession(all_pairs, store, rater="me").seed)
    assert len(seeds | {first.seed}) == 4
    old = tmp_path / "old.jsonl"  # human judgments written before seeds were stored: the old default, 0
    old.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "order_seed"}) + "\n"
                           for line in path.read_text().splitlines()))
    with pairs.JudgmentStore(old, "lima", "base") as store:
        assert human.RatingSession(all_pairs, store, rater="me").seed == 0
    assert len(pairs.read_judgments(path)) == 2  # table and agreement read the file as before


def test_the_cli_stores_the_seed_in_terminal_mode(response_files, tmp_path, monkeypatch, capsys):
    a, b = response_files
    path = tmp_path / "me.jsonl"
    run_terminal = human.run_terminal
    monkeypatch.setattr(human, "run_terminal", lambda session: run_terminal(session, _scripted(["1"]), print))
    eval_cli.main(["pairwise", "--a", str(a), "--b", str(b), "--judgments", str(path)])
    seed = json.loads(path.read_text())["order_seed"]
    monkeypatch.setattr(human, "run_terminal", lambda session: run_terminal(session, _scripted(["2"]), print))
    eval_cli.main(["pairwise", "--a", str(a), "--b", str(b), "--judgments", str(path)])
    assert f"display order: seed stored in {path}" in capsys.readouterr().out
    assert [json.loads(line)["order_seed"] for line in path.read_text().splitlines()] == [seed, seed]


# ------------------------------------------------------------------------------------ judgments files


def test_an_ordinary_text_file_as_judgments_is_refused_and_left_byte_identical(response_files, tmp_path, capsys):
    a, b = response_files
    cases = {
        "notes.txt": (b"my notes\nsecond line\nlast line, no newline", ":1: malformed JSON"),
        "one_line.txt": (b"just one line", ":1: malformed JSON"),
        "answers.jsonl": (a.read_bytes(), ":1: not a judgment (needs pair_id"),  # a response file by mistake
        "empty_object.jsonl": (b"{}", ":1: not a judgment"),
        "latin1.jsonl": ('{"pair_id": "caf\u00e9"}\n'.encode("latin-1"), ":1: not valid UTF-8 (byte offset 16)"),
    }
    with pairs.JudgmentStore(tmp_path / "real.jsonl", "lima", "base") as store:
        store.add(pairs.make_pairs(a, b)[0], "a")
    judged = (tmp_path / "real.jsonl").read_bytes()
    cases["judgments_then_text.jsonl"] = (judged + b"a note typed at the end", ":2: malformed JSON")
    cases["judgments_then_json.jsonl"] = (judged + b'{"note": 1}', ":2: not a judgment")
    cases["text_then_cut_judgment.jsonl"] = (b"notes\n" + judged[:20], ":1: malformed JSON")
    cases["other_systems.jsonl"] = (judged.replace(b'"base"', b'"gpt"')[:-1],
                                    ":1: judges 'lima' vs 'gpt', not 'lima' vs 'base'")
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            pairs.JudgmentStore(path, "lima", "base")
        assert str(e.value).startswith(f"{path}{message}"), (name, str(e.value))
        assert path.read_bytes() == content, name
    path = tmp_path / "notes.txt"
    with pytest.raises(SystemExit) as exit_info:
        lima_cli.run(eval_cli.main, ["pairwise", "--a", str(a), "--b", str(b), "--judgments", str(path)])
    assert exit_info.value.code == 2 and path.read_bytes() == cases["notes.txt"][0]
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:1: malformed JSON") and "not a judgments file" in err


def test_a_judgments_file_with_a_truncated_or_unterminated_last_line_is_still_repaired(response_files, tmp_path):
    all_pairs = pairs.make_pairs(*response_files)
    path = tmp_path / "me.jsonl"
    with pairs.JudgmentStore(path, "lima", "base") as store:
        store.add(all_pairs[0], "a")
        store.add(all_pairs[1], "b")
    complete = path.read_bytes()
    last = complete.splitlines(keepends=True)[-1]
    for cut in (b"{", b'{"pair_id": "', last[:40], last[:-2]):  # a crash at any point of the last write
        path.write_bytes(complete + cut)
        with pairs.JudgmentStore(path, "lima", "base") as store:
            assert store.done == {all_pairs[0].pair_id, all_pairs[1].pair_id}
        assert path.read_bytes() == complete
    path.write_bytes(complete[:-1])  # complete, only the newline missing: kept, the newline added
    with pairs.JudgmentStore(path, "lima", "base") as store:
        assert len(store.records) == 2
    assert path.read_bytes() == complete


# ------------------------------------------------------------------------------------------ statistics


def test_wilson_interval_and_table(tmp_path):
    low, high = stats.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert stats.wilson_interval(0, 20)[0] == 0.0 and stats.wilson_interval(20, 20)[1] == 1.0
    judgments = [{"pair_id": str(i), "a_name": "LIMA", "b_name": "Alpaca", "winner": w}
                 for i, w in enumerate("a" * 6 + "t" * 3 + "b")]
    judgments = [{**j, "winner": "tie" if j["winner"] == "t" else j["winner"]} for j in judgments]
    outcome = stats.outcome(judgments)
    assert (outcome.wins, outcome.ties, outcome.losses, outcome.n) == (6, 3, 1, 10)
    table = stats.table_markdown([outcome])
    assert "| LIMA | Alpaca | 10 | 60.0% [31.3, 83.2] | 30.0% [10.8, 60.3] | 10.0% [1.8, 40.4] | 0 |" in table
    png = stats.plot_outcomes([outcome, outcome], tmp_path / "fig.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tie_discounted_agreement_matches_systems_by_name():
    def rater(a_name, b_name, winners):
        return [{"pair_id": str(i), "a_name": a_name, "b_name": b_name, "winner": w} for i, w in enumerate(winners)]
    first = rater("LIMA", "GPT", ["a", "a", "tie", "b", "tie"])
    second = rater("LIMA", "GPT", ["a", "tie", "b", "a", "tie"])
    result = stats.agreement(first, second)  # 1 + 0.5 + 0.5 + 0 + 1
    assert result.n == 5 and result.tie_discounted_accuracy == pytest.approx(3 / 5)
    assert result.exact_agreement == pytest.approx(2 / 5)
    swapped = rater("GPT", "LIMA", ["b", "tie", "a", "b", "tie"])  # the same opinions, A and B swapped
    assert stats.agreement(first, swapped) == result
    with pytest.raises(ValueError, match="different systems"):
        stats.agreement(first, rater("LIMA", "Bard", ["a"]))


def test_table_and_agreement_commands(tmp_path, capsys):
    paths = []
    for name, winners in (("r1", "aabt"), ("r2", "abbt")):
        path = tmp_path / f"{name}.jsonl"
        _write(path, [{"pair_id": str(i), "a_name": "LIMA", "b_name": "DaVinci003",
                       "winner": {"t": "tie"}.get(w, w)} for i, w in enumerate(winners)])
        paths.append(path)
    eval_cli.main(["table", str(paths[0]), "--png", str(tmp_path / "f.png"), "--md", str(tmp_path / "t.md")])
    assert "| LIMA | DaVinci003 | 4 | 50.0%" in capsys.readouterr().out and (tmp_path / "f.png").is_file()
    eval_cli.main(["agreement", str(paths[0]), str(paths[1])])
    assert re.search(r"tie-discounted accuracy: 75.0%", capsys.readouterr().out)


def test_eval_cli_bad_input_is_one_error_line_and_status_2_and_help_exits_0(repo):
    result = subprocess.run([sys.executable, "-m", "lima_jax.eval", "table", "/nonexistent.jsonl"],
                            capture_output=True, text=True, cwd=repo)
    assert result.returncode == 2, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: /nonexistent.jsonl: file not found"]
    assert "Traceback" not in result.stderr and result.stdout == ""
    for command in ([], ["pairwise"], ["table"], ["agreement"]):
        result = subprocess.run([sys.executable, "-m", "lima_jax.eval", *command, "--help"], capture_output=True,
                                text=True, cwd=repo)
        assert result.returncode == 0, result.stderr
        assert "usage: python -m lima_jax.eval " + " ".join(command) in result.stdout


def test_usage_errors_are_config_errors(response_files, tmp_path, capsys):
    a, b = response_files
    same = tmp_path / "other" / a.name
    same.parent.mkdir()
    same.write_text(a.read_text())
    with pytest.raises(SystemExit) as exit_info:
        lima_cli.run(eval_cli.main, ["pairwise", "--a", str(a), "--b", str(same), "--judgments", str(tmp_path / "j")])
    assert exit_info.value.code == 2 and "both systems are named 'lima'; set --a_name" in capsys.readouterr().err
    for argv, message in (
            (["--mode", "judge"], "--mode judge needs --judge_url"),
            (["--mode", "judge", "--judge_url", "http://127.0.0.1:9/v1"], "--judge_model is required"),
            (["--judge_config.seed=3"], "--judge_config.seed: only for `pairwise --mode judge --judge_checkpoint`")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            eval_cli.main(["pairwise", "--a", str(a), "--b", str(b), "--judgments", str(tmp_path / "j"), *argv])
    assert lima_cli.split_overrides(flag="judge_config", argv=["x", "--judge_config.mesh.fsdp=8", "--judge_config.seed", "3", "y"]) == (
        ["x", "y"], [("mesh.fsdp", "8"), ("seed", "3")])


def test_the_lima_jax_judge_is_built_by_the_entry_point_from_the_generation_workflow(
        response_files, tmp_path, monkeypatch, repo, toy_tokenizer):
    """`--judge_checkpoint` (+ `--judge_config FILE`, its overrides) reaches `generation.build_generator`;
    the evaluation package gets the finished generator. A fake generation module: no model is compiled."""
    import dataclasses
    import types

    @dataclasses.dataclass(frozen=True)
    class SamplingConfig:
        greedy: bool = False
        repetition_penalty: float = 1.2
        max_new_tokens: int = 2048

    calls, configs = [], []

    class FakeGenerator:
        tokenizer = toy_tokenizer

        def generate_ids(self, ids, settings):
            calls.append(("generate", len(ids), settings))
            return [types.SimpleNamespace(text="[[1]]") for _ in ids]

    def build_generator(config, choice, batch_size):
        configs.append(config)
        calls.append(("build", config.seed, config.source_file, str(choice.folder), batch_size))
        return FakeGenerator()

    fake = types.ModuleType("lima_jax.generation")
    fake.SamplingConfig, fake.build_generator = SamplingConfig, build_generator
    monkeypatch.setitem(sys.modules, "lima_jax.generation", fake)
    from lima_jax import rundir  # which checkpoint: rundir's rules, as `generate --checkpoint` (no real one here)
    monkeypatch.setattr(rundir, "resolve_checkpoint",
                        lambda path: types.SimpleNamespace(folder=path, describe=lambda: f"fake {path}"))
    out = tmp_path / "j.jsonl"
    common = ["pairwise", "--a", str(response_files[0]), "--b", str(response_files[1]), "--judgments", str(out),
              "--mode", "judge", "--chunk", "3", "--judge_max_tokens", "7"]
    eval_cli.main(common + ["--judge_config", str(repo / "configs" / "toy.py"), "--judge_checkpoint", "CKPT",
                            "--judge_config.seed", "123"])
    assert calls[0] == ("build", 123, str(repo / "configs" / "toy.py"), "CKPT", 6)
    assert {c[2] for c in calls[1:]} == {SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=7)}
    records_ = pairs.read_judgments(out)
    assert len(records_) == len(ANSWERS) and {r["rater"] for r in records_} == {"lima_jax:CKPT"}
    # Without --judge_config: the config.json of the run the checkpoint belongs to.
    run = tmp_path / "run"
    (run / "checkpoints" / "100").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seed": 5, "mesh": {"data": 1}}))
    calls.clear()
    eval_cli.main(common[:6] + [str(tmp_path / "j2.jsonl")] + common[7:] +
                  ["--judge_checkpoint", str(run / "checkpoints" / "100"), "--judge_config.mesh.data=2"])
    assert calls[0][:3] == ("build", 5, str(run / "config.json")) and configs[-1].mesh.data == 2
    with pytest.raises(ConfigError, match="--judge_config.nope=1: .* has no field 'nope'"):
        eval_cli.main(common + ["--judge_checkpoint", str(run), "--judge_config.nope=1"])
    with pytest.raises(ConfigError, match="not in a run directory with a config.json"):
        eval_cli.main(common + ["--judge_checkpoint", str(tmp_path / "elsewhere")])


def test_judgments_on_an_object_store_are_rewritten_whole(response_files, tmp_path, monkeypatch):
    """gs:// cannot append: there each judgment rewrites the object (here a local file taken for one)."""
    monkeypatch.setattr(pairs, "is_remote", lambda path: True)
    found = pairs.make_pairs(*response_files)
    path = tmp_path / "remote.jsonl"
    with pairs.JudgmentStore(path, "lima", "base") as store:
        assert store._file is None  # no open handle: nothing is appended
        store.add(found[0], "a")
        store.add(found[1], "tie")
    path.write_bytes(path.read_bytes() + b'{"pair_id": "cut sh')  # a torn last line is dropped on reopening
    with pairs.JudgmentStore(path, "lima", "base") as store:
        assert store.done == {found[0].pair_id, found[1].pair_id}
        store.add(found[2], "b")
    assert [r["winner"] for r in pairs.read_judgments(path)] == ["a", "tie", "b"]
