"""Answer prompts with a lima_jax model (LIMA's sampling by default) and write them as JSONL.

    python -m lima_jax.generate --checkpoint /tmp/lima_toy --prompts data/toy_dev.jsonl --out /tmp/answers.jsonl
    python -m lima_jax.generate --config configs/toy.py --config.mesh.data=2 --checkpoint CKPT --prompts P --out O

`--checkpoint` is a training workdir (its chosen epoch, see `lima_jax.report choose`, else the latest
checkpoint), one training checkpoint `workdir/checkpoints/<step>`, or a parameter checkpoint (`model.json`
+ `params/`, what `lima_jax.convert` writes). Without `--config`, the run's own `config.json` is used, so no
training override has to be repeated; `--config.a.b=v` overrides any field either way.

Sampling defaults are LIMA's: nucleus p=0.9, temperature 0.7, repetition penalty 1.2 on generated tokens
only, at most 2,048 new tokens, stop at EOT (or EOS). The output schema is described in `lima_jax.records`.

`--prompt_format=completion` samples a base model (an import, which has no EOT row): each prompt is one text,
encoded as `<bos> text` with no turn format, and the model continues it until EOS. Its answers are an answer
file like any other, so base and fine-tuned models' answers to the same prompts compare with `lima_jax.eval`:

    python -m lima_jax.generate --config configs/stories260k.py --checkpoint /tmp/s260k \
        --prompt_format=completion --prompts P --out base.jsonl
"""
from __future__ import annotations

import jax

from lima_jax import cli, rundir
from lima_jax.config import validate
from lima_jax.generation import SamplingConfig, answer_prompts, build_generator
from lima_jax.records import PROMPT_FORMATS, STOP_REASONS, check_prompts_fit, read_prompts, write_jsonl
from lima_jax.tokenizer import load_tokenizer


def build_parser():
    p = cli.parser("lima_jax.generate", __doc__)
    cli.add_config_flags(p, required=False)
    p.add_argument("--checkpoint", required=True, help="workdir, workdir/checkpoints/<step> or params folder")
    p.add_argument("--prompts", required=True, help="prompt JSONL")
    p.add_argument("--out", required=True, help="output JSONL")
    defaults = SamplingConfig()
    p.add_argument("--temperature", type=float, default=defaults.temperature)
    p.add_argument("--top_p", type=float, default=defaults.top_p)
    p.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)
    p.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (repetition penalty still applies)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--batch_size", type=int, default=8, help="rows per batch (rounded up to the data ways)")
    p.add_argument("--no_cache", action="store_true", help="recompute the full forward pass every step")
    p.add_argument("--prompt_format", choices=PROMPT_FORMATS, default="chat",
                   help="chat: lima_jax's turn format, the model answers as the assistant; completion: plain text "
                   "continued until EOS, for a base model (one text per prompt)")
    cli.add_distributed_flags(p)
    return p


def main(argv: list[str]) -> None:
    p = build_parser()
    args, config = cli.parse(p, argv, default_config=lambda a: rundir.run_config_of(a.checkpoint))
    if config is None:
        p.error(f"--config is required: {args.checkpoint} is not (inside) a run directory with a config.json")
    cli.initialize_distributed(args)
    cli.setup_logging()
    settings = SamplingConfig(args.temperature, args.top_p, args.repetition_penalty, args.max_new_tokens,
                              args.greedy, args.seed)
    settings.validate()
    validate(config, paths=False)
    prompts = read_prompts(args.prompts)  # bad input fails here, before the model is loaded
    tokenizer = load_tokenizer(config)
    print(f"tokenizer: {tokenizer.describe()}", flush=True)
    check_prompts_fit(prompts, tokenizer, config.model.max_seq_len, args.prompt_format)
    choice = rundir.resolve_checkpoint(args.checkpoint)
    print(f"checkpoint: {choice.describe()}; prompt format: {args.prompt_format}", flush=True)
    generator = build_generator(config, choice, args.batch_size, not args.no_cache, args.prompt_format, tokenizer)
    records = answer_prompts(generator, prompts, settings, args.prompt_format)
    if jax.process_index() == 0:
        write_jsonl(args.out, records)
        reasons = {r: sum(rec["stop_reason"] == r for rec in records) for r in STOP_REASONS[1:]}
        print(f"wrote {len(records)} answers to {args.out}; stop reasons {reasons}")


if __name__ == "__main__":
    cli.run(main)
