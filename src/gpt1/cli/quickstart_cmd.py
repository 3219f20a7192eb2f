"""`gpt1 quickstart`: every stage of the pipeline on built-in data, in minutes on a CPU."""

from __future__ import annotations

import argparse

from gpt1.cli.args import folder_arg

# gpt1.quickstart (torch) is imported by the command: `gpt1 --help` imports this module. Its
# QuickstartConfig's defaults, for the flags (a test keeps the two equal):
DEFAULTS = argparse.Namespace(out="gpt1-quickstart", minutes=5.0, device="auto", seed=1337)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="the whole pipeline on built-in data in minutes: tokenizer, pretraining, chat tuning, samples",
        description="Train a tokenizer on the Python standard library's source, pretrain the tiny model on it, "
                    "LoRA-tune it into a chat model on the English dialogs of chatterbot-corpus, and print samples "
                    "for the model card's three uses. Nothing is downloaded. A rerun reuses finished stages (the "
                    "scores and samples too, while the models and settings they were made with are unchanged); "
                    "a killed run resumes.")
    parser.add_argument("--out", type=folder_arg, default=DEFAULTS.out, help=f"output folder (default: {DEFAULTS.out})")
    parser.add_argument("--minutes", type=float, default=DEFAULTS.minutes,
                        help=f"pretraining time budget; the chat fine-tune gets a quarter of it (default: {DEFAULTS.minutes:g})")
    parser.add_argument("--device", default=DEFAULTS.device, help="auto (cuda > mps > cpu), cpu, cuda or mps (default: auto)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"random seed (default: {DEFAULTS.seed})")
    parser.set_defaults(func=quickstart_command)


def quickstart_command(args: argparse.Namespace) -> int:
    from gpt1.quickstart import QuickstartConfig, run_quickstart

    result = run_quickstart(QuickstartConfig(out=args.out, minutes=args.minutes, device=args.device, seed=args.seed))
    print(report(result))
    return 0


def _ppl(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _bpb(value: float | None) -> str:
    return "bits per byte n/a" if value is None else f"{value:.3f} bits per byte"


def _took(result, stage: str, seconds: float) -> str:
    early = f", done after {result.ended_early[stage]}" if stage in result.ended_early else ""
    plan = f"planned {result.planned[stage]:.0f} s{early}" if stage in result.planned else ""
    if stage in result.reused:  # the figures of the run that made it
        return f"{stage} reused (made in {seconds:.0f} s" + (f", {plan})" if plan else ")")
    return f"{stage} {seconds:.0f} s" + (f" ({plan})" if plan else "")


def report(result) -> str:
    """What the quickstart made, its samples, and what to type next."""
    took = " + ".join(_took(result, name, seconds) for name, seconds in result.seconds.items())
    lines = [
        "",
        f"gpt1 quickstart: done ({took}). This is a tiny model "
        f"({result.base_parameters / 1e6:.1f}M parameters, a few minutes on a CPU):",
        "expect fluent-looking fragments, not answers.",
        "",
        f"  base model  {result.base}  {result.base_steps:,} steps on {result.train_tokens:,} tokens of Python source, "
        f"held-out perplexity {_ppl(result.base_val_perplexity)}, {_bpb(result.base_val_bits_per_byte)}",
        f"  chat model  {result.chat}  {result.chat_steps:,} LoRA steps on chatterbot dialogs, "
        f"held-out perplexity (assistant replies) {_ppl(result.chat_val_perplexity)}, {_bpb(result.chat_val_bits_per_byte)}",
        f"  curves      {result.plot or 'not drawn (the warning above says why)'}",
    ]
    for sample in result.samples:
        settings = ", ".join(f"{k}={v}" for k, v in sample.settings.items())
        if sample.use == "base":
            lines += ["", f"--- the base model continues Python code ({settings})", sample.text]
        else:
            lines += ["", f"--- {sample.use} ({settings})", f"user: {sample.prompt}", f"assistant: {sample.text}"]
    lines += [
        "",
        "Next:",
        f"  gpt1 chat --model {result.chat}                         # talk to it in the terminal",
        f"  gpt1 serve --model {result.chat}                        # OpenAI-compatible API + chat page on http://127.0.0.1:8000",
        # --merge: transformers' pipeline / AutoModelForCausalLM load an export's base without a word
        # of its adapter/ (the fine-tune), so the folder a newcomer loads first holds it merged in.
        f"  gpt1 export --model {result.chat} --out {result.out / 'hf'} --merge   # a transformers folder, LoRA merged in",
        f"  gpt1 eval --model {result.base} --data {result.data}   # held-out perplexity and bits per byte",
        *_extras_line(),
        "  The full-scale recipes on a GPU (the model card's 257M model, OpenWebText, then OASST2):",
        "    gpt1 tokenizer train --vocab-size 51682 --out tok hf:Skylion007/openwebtext",
        "    gpt1 prepare --tokenizer tok --out data/owt hf:Skylion007/openwebtext",
        "    gpt1 pretrain --config gpt1-openwebtext --data data/owt --out runs/gpt1",
        "    gpt1 finetune --config gpt1-oasst2-lora --base runs/gpt1 --out runs/gpt1-chat",
    ]
    return "\n".join(lines)


def _extras_line() -> list[str]:
    """How to install what the lines above need (`serve`: FastAPI; loading the export: transformers),
    as this copy of gpt1 was installed; nothing when both are there."""
    import importlib.util
    from pathlib import Path

    import gpt1
    from gpt1.core.environment import checkout_root
    needs = {"serve": ("fastapi", "serve needs the `serve` extra"),
             "hf": ("transformers", "loading the export in transformers the `hf` extra")}
    missing = [extra for extra, (module, _) in needs.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return []
    extras = ",".join(missing)
    in_checkout = checkout_root(Path(gpt1.__file__).resolve().parent) is not None
    install = f'pip install -e ".[{extras}]"' if in_checkout else f'pip install "gpt1[{extras}]"'
    return [f"  ({', and '.join(needs[extra][1] for extra in missing)}: {install})"]
