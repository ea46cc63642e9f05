"""A `to_hf` export checked against the real clients: transformers (any installed version, e.g. 4.57 in its own
venv), llama.cpp's own converter + llama-cpp-python. Prints one table row per client and writes the details.

    python benchmarks/export_clients.py --checkpoint /tmp/s260k_lima --out /tmp/clients \
        [--python /work/venv457/bin/python ...]            # more transformers installs, each its own interpreter
        [--convert /src/llama.cpp/convert_hf_to_gguf.py --convert_python PY]   # PY has torch + gguf (+ its
                                                            # `conversion` folder beside it, as in llama.cpp)
        [--llama_python /work/venvllama/bin/python]         # has llama-cpp-python

Reference: lima_jax itself, in this interpreter: `encode_dialog` ids of the 300 LIMA test prompts (alone and after a
system message, which lima_jax's reader joins to the first user turn with a blank line), the MT-Bench questions as
multi-turn conversations (question 1, a fixed answer, question 2), plain text `<bos> text`, and greedy decoding
(repetition penalty 1, the clients' default) of a few prompts by `lima_jax.generation`.

Clients run in their own interpreters (`client-transformers`, `client-llamacpp` below: standard library and the
client's package only, no lima_jax), reading the reference from a JSON file, so any installed version can be
checked. The llama.cpp GGUF is converted as users do (`convert_hf_to_gguf.py <export> --outtype f32`), and a
second copy gets the stop-token metadata fix of docs/checkpoints.md (`gguf-new-metadata` with eos = `</s>`,
eot = `<eot>`), because llama-cpp-python's chat completion stops as soon as the *prompt's* last token is its
eos, and every LIMA prompt ends with `<eot>`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
SYSTEM = "You are a helpful assistant. Answer briefly."
MT_ANSWER = "Here is my first answer."
GREEDY_PROMPTS = ["How do I make coffee?", "What is the capital of France?", "Tell me a story about a dog.",
                  "Write a short poem about the sun.", "What is the capital of Japan?"]
NEW_TOKENS = 256  # long enough for a fine-tuned stories260K's answers to end on EOT (--new_tokens)


# ------------------------------------------------------------------------------------------- reference


def reference(args: argparse.Namespace, out: pathlib.Path) -> pathlib.Path:
    """Exports the checkpoint and writes lima_jax's ids and greedy tokens (reference.json)."""
    sys.path.insert(0, str(REPO))
    from lima_jax import convert, rundir
    from lima_jax.config import load_config_file
    from lima_jax.generation import SamplingConfig, build_generator
    from lima_jax.records import read_prompts

    hf = out / "hf"
    convert.main(["to_hf", "--input", args.checkpoint, "--output", str(hf), "--overwrite"])
    choice = rundir.resolve_checkpoint(args.checkpoint)
    config = load_config_file(rundir.run_config_of(choice.folder))
    generator = build_generator(config, choice, 8)
    tok = generator.tokenizer
    lima = [p.turns[0] for p in read_prompts(args.lima_prompts)]
    mt = [p.input for p in read_prompts(args.mt_bench)]

    def chat(system, turns):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        joined = [f"{system}\n\n{turns[0]}" if system else turns[0], *turns[1:]]  # lima_jax.data.formats
        return {"messages": messages, "ids": tok.encode_dialog(joined).ids}

    sets = {
        "lima_test": [chat(None, [q]) for q in lima],
        "lima_test+system": [chat(SYSTEM, [q]) for q in lima],
        "mt_bench_multi_turn": [chat(None, [q[0], MT_ANSWER, q[1]]) for q in mt],
    }
    plain = [{"text": q, "ids": [tok.bos_id] + tok.encode(q)} for q in lima]
    settings = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=args.new_tokens)
    prompts = [tok.encode_dialog([q]).ids for q in GREEDY_PROMPTS]
    stop = {"eot": [tok.eot_id], "eos": [tok.eos_id]}
    greedy = [{"question": q, "prompt": p, "new": c.ids + stop.get(c.stop_reason, []), "stop": c.stop_reason}
              for q, p, c in zip(GREEDY_PROMPTS, prompts, generator.generate_ids(prompts, settings))]
    data = {"hf": str(hf), "chat": sets, "plain": plain, "greedy": greedy, "new_tokens": args.new_tokens,
            "eot_id": tok.eot_id, "eos_id": tok.eos_id, "bos_id": tok.bos_id}
    path = out / "reference.json"
    path.write_text(json.dumps(data))
    print(f"reference: {sum(len(s) for s in sets.values())} chats, {len(plain)} texts, greedy stops "
          f"{[g['stop'] for g in greedy]}", flush=True)
    return path


# --------------------------------------------------------------------------------------------- clients


def _exact(pairs) -> str:
    pairs = list(pairs)
    return f"{sum(a == b for a, b in pairs)}/{len(pairs)}"


def client_transformers(ref: dict) -> dict:
    """AutoTokenizer and LlamaTokenizer: chat and plain ids; the model: greedy generate and its stops."""
    import torch
    import transformers
    hf = ref["hf"]
    result = {"client": "transformers", "version": transformers.__version__, "tokenizers": {}}
    for name in ("AutoTokenizer", "LlamaTokenizer"):
        try:
            tok = getattr(transformers, name).from_pretrained(hf, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a client failing to load is the finding
            result["tokenizers"][name] = {"load": f"fails: {type(e).__name__}: {str(e)[:200]}"}
            continue
        row = {"load": type(tok).__name__}
        for set_name, chats in ref["chat"].items():
            row[set_name] = _exact((tok.apply_chat_template(c["messages"], add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)["input_ids"], c["ids"]) for c in chats)
        row["plain"] = _exact((tok(p["text"]).input_ids, p["ids"]) for p in ref["plain"])
        result["tokenizers"][name] = row
    tok = transformers.AutoTokenizer.from_pretrained(hf, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    greedy, stops = [], []
    for g in ref["greedy"]:
        inputs = tok.apply_chat_template([{"role": "user", "content": g["question"]}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, repetition_penalty=1.0, max_new_tokens=ref["new_tokens"])
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        greedy.append((new, g["new"]))
        if g["stop"] in ("eot", "eos"):
            stops.append((new[-1:], g["new"][-1:]))
    result["greedy"] = _exact(greedy)
    result["stops"] = _exact(stops)
    result["stop_prompts"] = len(stops)
    result["docs_example"] = _docs_example(hf)
    return result


def _docs_example(hf: str) -> str:
    """Runs the Python example of docs/checkpoints.md as written, with the export's path."""
    import contextlib
    import io
    import re
    docs = (REPO / "docs" / "checkpoints.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", docs, re.S) if "apply_chat_template" in b]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            exec(compile(code.replace('"/hf/lima-65b"', repr(hf)), "docs/checkpoints.md", "exec"), {})
    except Exception as e:  # noqa: BLE001 - the example failing is the finding
        return f"fails: {type(e).__name__}: {str(e)[:200]}"
    return f"runs ({len(out.getvalue().split())} words printed)"


def client_llamacpp(ref: dict, gguf: str) -> dict:
    """llama-cpp-python on a GGUF: plain and chat ids (its Jinja chat formatter over the GGUF's template),
    greedy tokens from lima_jax's prompt ids, and a chat completion."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, verbose=False, seed=0)
    meta = llm.metadata
    vocab = llm._model.vocab  # noqa: SLF001
    result = {"client": "llama-cpp-python", "version": llama_cpp.__version__, "gguf": gguf,
              "eos": llm.token_eos(), "eot": meta.get("tokenizer.ggml.eot_token_id"),
              "eog": [i for i in (ref["eot_id"], ref["eos_id"]) if llama_cpp.llama_vocab_is_eog(vocab, i)]}
    result["plain"] = _exact((llm.tokenize(p["text"].encode(), add_bos=True, special=False), p["ids"])
                             for p in ref["plain"])
    # llama.cpp's sentencepiece tokenizer does not apply the model's normalizer: with remove_extra_whitespaces
    # (tok512, the toy's; not Meta's LLaMA tokenizer) sentencepiece drops runs of spaces that llama.cpp keeps.
    # The same texts with those spaces removed first tell that difference from any other.
    result["plain_spaces_collapsed"] = _exact(
        (llm.tokenize(re.sub(" +", " ", p["text"]).strip(" ").encode(), add_bos=True, special=False), p["ids"])
        for p in ref["plain"])
    piece = lambda token: llm.detokenize([token], special=True).decode()  # noqa: E731
    formatter = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"], bos_token=piece(llm.token_bos()),
                                    eos_token=piece(llm.token_eos()))
    for set_name, chats in ref["chat"].items():
        result[set_name] = _exact((llm.tokenize(formatter(messages=c["messages"]).prompt.encode(), add_bos=False,
                                                special=True), c["ids"]) for c in chats)
    greedy, stops = [], []
    for g in ref["greedy"]:
        new = []
        llm.reset()
        for token in llm.generate(g["prompt"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            new.append(token)
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(new) >= ref["new_tokens"]:
                break
        greedy.append((new, g["new"]))
        if g["stop"] in ("eot", "eos"):
            stops.append((new[-1:], g["new"][-1:]))
    result["greedy"] = _exact(greedy)
    result["stops"] = _exact(stops)
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": GREEDY_PROMPTS[0]}],
                                        max_tokens=ref["new_tokens"],
                                        temperature=0.0, top_k=1, repeat_penalty=1.0)
    result["chat_completion"] = answer["choices"][0]["message"]["content"]
    result["chat_finish"] = answer["choices"][0]["finish_reason"]
    return result


def client_gguf_metadata(ref: dict, gguf_path: str) -> dict:
    """What a GGUF tells llama.cpp about the tokenizer (gguf-py's reader; no llama.cpp build needed): the
    pieces and their scores and types, the special ids, the chat template."""
    import gguf
    fields = gguf.GGUFReader(gguf_path).fields

    def value(key):
        return fields[key].contents() if key in fields else None
    tokens, scores, types = (value(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    eot = ref["eot_id"]
    return {"client": "gguf", "version": getattr(gguf, "__version__", "gguf-py"), "gguf": gguf_path,
            "model": value("tokenizer.ggml.model"), "pre": value("tokenizer.ggml.pre"), "tokens": len(tokens),
            "distinct_scores": len(set(scores)) if scores is not None else "none (BPE)",
            "eot_piece": tokens[eot], "eot_type": int(types[eot]), "control_type": int(gguf.TokenType.CONTROL),
            "eos": value("tokenizer.ggml.eos_token_id"), "eot": value("tokenizer.ggml.eot_token_id"),
            "bos": value("tokenizer.ggml.bos_token_id"),
            "chat_template_is_exported": value("tokenizer.chat_template") == json.loads(
                (pathlib.Path(ref["hf"]) / "tokenizer_config.json").read_text())["chat_template"]}


# -------------------------------------------------------------------------------------------- driver


def _run_client(python: str, command: list[str], out: pathlib.Path, name: str) -> dict | None:
    """Runs one client in its interpreter; its JSON result, or None (the failure printed)."""
    target = out / f"{name}.json"
    proc = subprocess.run([python, __file__, *command, "--result", str(target)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode:
        print(f"{name}: failed (exit {proc.returncode}): {proc.stderr[-1500:]}", flush=True)
        return None
    return json.loads(target.read_text())


def _convert_gguf(args: argparse.Namespace, hf: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    """convert_hf_to_gguf.py on the export, and a copy with eos=`</s>`, eot=`<eot>` (gguf-new-metadata)."""
    gguf, fixed = out / "model-f32.gguf", out / "model-f32-stopfix.gguf"
    for path in (gguf, fixed):
        path.unlink(missing_ok=True)
    tic = time.perf_counter()
    proc = subprocess.run([args.convert_python, args.convert, str(hf), "--outtype", "f32", "--outfile", str(gguf)],
                          capture_output=True, text=True)
    print(f"convert_hf_to_gguf.py: exit {proc.returncode} in {time.perf_counter() - tic:.1f} s", flush=True)
    (out / "convert_hf_to_gguf.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        print(proc.stderr[-1500:])
        return []
    ref = json.loads((out / "reference.json").read_text())
    proc = subprocess.run([args.convert_python, "-m", "gguf.scripts.gguf_new_metadata", str(gguf), str(fixed),
                           "--special-token-by-id", "eos", str(ref["eos_id"]), "--special-token-by-id", "eot",
                           str(ref["eot_id"]), "--force"], capture_output=True, text=True)
    (out / "gguf_new_metadata.log").write_text(proc.stdout + proc.stderr)
    print(f"gguf-new-metadata (eos={ref['eos_id']}, eot={ref['eot_id']}): exit {proc.returncode}", flush=True)
    return [gguf] + ([fixed] if proc.returncode == 0 else [])


def _rows(results: list[dict], new_tokens: int) -> list[str]:
    rows = ["| client | version | what was run | ids exact | stops | greedy equal |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r["client"] == "transformers":
            for name, t in r["tokenizers"].items():
                ids = t["load"] if "plain" not in t else ", ".join(f"{k} {v}" for k, v in t.items() if k != "load")
                rows.append(f"| transformers {name} ({t['load']}) | {r['version']} | apply_chat_template + tok(text) | "
                            f"{ids} | | |")
            rows.append(f"| transformers docs/checkpoints.md example | {r['version']} | as written | "
                        f"{r['docs_example']} | | |")
            rows.append(f"| transformers generate | {r['version']} | greedy, {new_tokens} new tokens, "
                        f"{r['greedy'].split('/')[1]} prompts | | {r['stops']} | "
                        f"{r['greedy']} |")
        elif r["client"] == "gguf":
            rows.append(f"| llama.cpp convert_hf_to_gguf.py -> {pathlib.Path(r['gguf']).name} | gguf-py {r['version']} | "
                        f"GGUF metadata: {r['model']} (pre {r['pre']}), {r['tokens']} pieces, "
                        f"{r['distinct_scores']} distinct scores, "
                        f"{r['eot_piece']!r} type {r['eot_type']} (control {r['control_type']}), eos {r['eos']}, "
                        f"eot {r['eot']}, bos {r['bos']}, chat template = export's: {r['chat_template_is_exported']} "
                        "| (needs llama.cpp) | | |")
        else:
            ids = ", ".join(f"{k} {r[k]}" for k in ("plain", "plain_spaces_collapsed", "lima_test", "lima_test+system",
                                                    "mt_bench_multi_turn"))
            rows.append(f"| llama-cpp-python {pathlib.Path(r['gguf']).name} (eos {r['eos']}, eot {r['eot']}, EOG "
                        f"{r['eog']}) | {r['version']} | tokenize, chat template, generate, chat completion "
                        f"({r['chat_finish']}: {r['chat_completion'][:40]!r}) | {ids} | {r['stops']} | {r['greedy']} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    for name in ("client-transformers", "client-llamacpp", "client-gguf"):
        p = sub.add_parser(name)
        p.add_argument("--reference", required=True)
        p.add_argument("--result", required=True)
        p.add_argument("--gguf")
    parser.add_argument("--checkpoint", help="a fine-tuned lima_jax run or checkpoint (with the EOT row)")
    parser.add_argument("--out", default="/tmp/export_clients")
    parser.add_argument("--python", action="append", default=[], help="another interpreter with transformers")
    parser.add_argument("--convert", help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--convert_python", default=sys.executable, help="interpreter with torch and gguf")
    parser.add_argument("--llama_python", help="interpreter with llama-cpp-python")
    parser.add_argument("--new_tokens", type=int, default=NEW_TOKENS, help="greedy tokens per prompt")
    parser.add_argument("--lima_prompts", default=str(SHARED / "lima" / "lima_test.jsonl"))
    parser.add_argument("--mt_bench", default=str(SHARED / "eval" / "mt_bench_question.jsonl"))
    args = parser.parse_args()
    if args.command:
        ref = json.loads(pathlib.Path(args.reference).read_text())
        clients = {"client-transformers": lambda: client_transformers(ref),
                   "client-llamacpp": lambda: client_llamacpp(ref, args.gguf),
                   "client-gguf": lambda: client_gguf_metadata(ref, args.gguf)}
        result = clients[args.command]()
        pathlib.Path(args.result).write_text(json.dumps(result, indent=2))
        return
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref_path = reference(args, out)
    results = []
    for i, python in enumerate([sys.executable, *args.python]):
        r = _run_client(python, ["client-transformers", "--reference", str(ref_path)], out, f"transformers_{i}")
        results += [r] if r else []
    if args.convert:
        for gguf in _convert_gguf(args, out / "hf", out):
            r = _run_client(args.convert_python, ["client-gguf", "--reference", str(ref_path), "--gguf", str(gguf)],
                            out, f"gguf_{gguf.stem}")
            results += [r] if r else []
            if args.llama_python:
                r = _run_client(args.llama_python, ["client-llamacpp", "--reference", str(ref_path), "--gguf",
                                                    str(gguf)], out, f"llamacpp_{gguf.stem}")
                results += [r] if r else []
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(_rows(results, args.new_tokens)))


if __name__ == "__main__":
    main()
