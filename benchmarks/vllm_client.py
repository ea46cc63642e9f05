"""A `to_hf` export served by vLLM's OpenAI-compatible server on 127.0.0.1, checked against lima_jax itself:
prompt ids of chat requests (vLLM's /tokenize with the export's chat template) equal `encode_dialog`'s, greedy
chat completions (temperature 0, repetition penalty 1) equal lima_jax's greedy tokens, and generation stops on
EOT (finish_reason "stop", the EOT id last). vLLM refuses head_dim 8 (stories260K), so use a head_dim-64 model,
e.g. the toy recipe at dim 128 with 2 heads:

    python -m lima_jax.train --config configs/toy.py --config.workdir=/tmp/toy128 --config.model.dim=128 \
        --config.model.n_heads=2 --config.model.n_kv_heads=2 --config.model.n_layers=2 --config.model.hidden_dim=256
    python benchmarks/vllm_client.py --checkpoint /tmp/toy128 --vllm_python /work/venvvllm/bin/python

The reference (export + lima_jax ids and greedy) is `export_clients.reference`; the server is vLLM's own
`vllm serve` process (it spawns its engine workers), the client only the standard library.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from export_clients import NEW_TOKENS, SHARED, reference  # noqa: E402


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _wait_ready(base: str, server: subprocess.Popen, timeout_s: float) -> float:
    tic = time.perf_counter()
    while time.perf_counter() - tic < timeout_s:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.returncode} (see its log)")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5):
                return time.perf_counter() - tic
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    raise RuntimeError(f"vllm serve not ready after {timeout_s:.0f} s")


def check(base: str, model: str, ref: dict) -> dict:
    """Prompt ids per reference set, then greedy chat completions and their stops."""
    result = {}
    for name, chats in ref["chat"].items():
        same = sum(_post(f"{base}/tokenize", {"model": model, "messages": c["messages"],
                                              "add_generation_prompt": True})["tokens"] == c["ids"] for c in chats)
        result[name] = f"{same}/{len(chats)}"
    greedy, stops = 0, []
    for g in ref["greedy"]:
        reply = _post(f"{base}/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": g["question"]}], "max_tokens": ref["new_tokens"],
            "temperature": 0, "repetition_penalty": 1.0, "return_token_ids": True})
        choice = reply["choices"][0]
        new = choice.get("token_ids")
        if new is None:  # older servers: re-tokenize the text is not exact; count it as unknown
            new = []
        prompt_ok = reply.get("prompt_token_ids") in (None, g["prompt"])
        greedy += int(prompt_ok and new == g["new"])
        if g["stop"] == "eot":
            stops.append(choice["finish_reason"] == "stop" and new[-1:] == [ref["eot_id"]])
        result.setdefault("details", []).append({"question": g["question"], "lima_jax": g["new"], "vllm": new,
                                                 "finish_reason": choice["finish_reason"],
                                                 "text": choice["message"]["content"]})
    result["greedy"] = f"{greedy}/{len(ref['greedy'])}"
    result["stops"] = f"{sum(stops)}/{len(stops)}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a fine-tuned lima_jax run (head_dim 64 or more)")
    parser.add_argument("--out", default="/tmp/vllm_client")
    parser.add_argument("--vllm_python", required=True, help="interpreter with vLLM (its own venv)")
    parser.add_argument("--port", type=int, default=8711)
    parser.add_argument("--ready_timeout_s", type=float, default=900)
    parser.add_argument("--memory_fraction", type=float, default=0.1, help="vLLM's --gpu-memory-utilization, on "
                        "the CPU backend the share of host memory it reserves (its 0.92 default fails on a "
                        "shared host)")
    parser.add_argument("--new_tokens", type=int, default=NEW_TOKENS, help="greedy tokens per prompt")
    parser.add_argument("--lima_prompts", default=str(SHARED / "lima" / "lima_test.jsonl"))
    parser.add_argument("--mt_bench", default=str(SHARED / "eval" / "mt_bench_question.jsonl"))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = json.loads(reference(args, out).read_text())
    version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    base = f"http://127.0.0.1:{args.port}"
    log = (out / "vllm_serve.log").open("w")
    server = subprocess.Popen([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", ref["hf"],
                               "--served-model-name", "lima", "--host", "127.0.0.1", "--port", str(args.port),
                               "--dtype", "float32", "--max-model-len", "256",
                               "--gpu-memory-utilization", str(args.memory_fraction)], stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        ready = _wait_ready(base, server, args.ready_timeout_s)
        print(f"vllm {version}: ready in {ready:.0f} s", flush=True)
        result = {"version": version, "ready_s": ready, **check(base, "lima", ref)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    (out / "vllm_result.json").write_text(json.dumps(result, indent=2))
    ids = ", ".join(f"{k} {v}" for k, v in result.items() if k in ref["chat"])
    print("| client | version | what was run | ids exact | stops | greedy equal |\n"
          "| --- | --- | --- | --- | --- | --- |")
    print(f"| vLLM OpenAI server | {version} | /tokenize (chat template) + /v1/chat/completions, temperature 0, "
          f"repetition_penalty 1, {args.new_tokens} tokens | {ids} | {result['stops']} | {result['greedy']} |")


if __name__ == "__main__":
    main()
