"""edgelm chat: a REPL over the model's own chat template (tokenizer.chat_template in the GGUF)."""

from __future__ import annotations

import argparse
import sys

from edgelm.commands.common import (add_device_argument, add_kv_bits_argument, add_model_argument,
                                    add_precision_argument, add_sampling_arguments, add_threads_argument, load_model,
                                    sampling_params, set_threads)

HELP = "Type a message and press Enter. /clear starts over, /exit (or Ctrl-D) quits."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(parser)
    add_threads_argument(parser)
    add_device_argument(parser)
    add_kv_bits_argument(parser)


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Render the conversation and tokenize it with its special tokens; BOS is added once."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    bos_text = tokenizer.token_bytes(tokenizer.bos_id).decode("utf-8", "replace") if tokenizer.bos_id is not None else None
    template_has_bos = bool(bos_text) and text.startswith(bos_text)
    return tokenizer.encode(text, add_bos=False if template_has_bos else None, parse_special=True)


def run(args: argparse.Namespace) -> int:
    import edgelm
    from edgelm.runtime.engine import KernelEngine

    params = sampling_params(args)
    model, tokenizer = load_model(args, for_inference=True, kernels_only=True)
    set_threads(args.threads, pytorch=not isinstance(model, KernelEngine))
    model.set_kv_bits(args.kv_bits)
    if tokenizer.chat_template is None:
        from edgelm.errors import TokenizerError

        raise TokenizerError(f"{args.model} has no chat template (a base model); use `edgelm generate` instead")
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/clear":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for response in edgelm.stream_generate(model, tokenizer, encode_chat(tokenizer, messages),
                                               max_tokens=args.max_tokens, sampling=params, stop=args.stop):
            sys.stdout.write(response.text)
            sys.stdout.flush()
            reply.append(response.text)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
