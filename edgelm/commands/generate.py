"""edgelm generate: stream a completion to the terminal."""

from __future__ import annotations

import argparse
import sys

from edgelm.commands.common import (
    add_device_argument,
    add_kv_bits_argument,
    add_model_argument,
    add_precision_argument,
    add_sampling_arguments,
    add_threads_argument,
    load_model,
    sampling_params,
    set_threads,
)
from edgelm.errors import GenerationError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("-p", "--prompt", required=True, help="prompt text ('-' reads standard input)")
    add_sampling_arguments(parser)
    add_threads_argument(parser)
    add_device_argument(parser)
    add_kv_bits_argument(parser)
    parser.add_argument("--no-bos", action="store_true", help="do not add the BOS token to the prompt")
    parser.add_argument("--draft", default=None, metavar="MODEL_OR_BITS",
                        help="speculative decoding: a smaller model with the same vocabulary, or a bit width "
                             "N for the model itself at N bits (any-precision model directories)")
    parser.add_argument("--num-draft", type=int, default=3, metavar="N",
                        help="tokens the draft proposes per round (default: 3)")
    parser.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                        help="the draft scores only the first N token ids and those of the context (output "
                             "unchanged: the target checks every token); 0 = all (default: 32768)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print speed statistics to stderr")


def run(args: argparse.Namespace) -> int:
    import edgelm
    from edgelm.runtime.engine import KernelEngine

    params = sampling_params(args)
    if args.draft is None and args.draft_vocab is not None:
        raise GenerationError("--draft-vocab applies to speculative decoding: add --draft MODEL")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    # With --draft too: the target decodes as it would alone, so the greedy text is the same.
    model, tokenizer = load_model(args, for_inference=True, kernels_only=True)
    model.set_kv_bits(args.kv_bits)
    draft = load_draft(args, model)
    engines_only = all(isinstance(m, KernelEngine) for m in (model, draft) if m is not None)
    set_threads(args.threads, pytorch=not engines_only)
    spec = None
    if draft is not None:
        from edgelm.runtime.speculative import SpeculativeStats

        spec = SpeculativeStats()
    last = None
    for response in edgelm.stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                           sampling=params, stop=args.stop,
                                           add_bos=False if args.no_bos else None, draft=draft,
                                           num_draft=args.num_draft, spec_stats=spec,
                                           draft_vocab=args.draft_vocab):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        last = response
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        s = last.stats
        print(f"prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.1f} tok/s | generation: "
              f"{s.generation_tokens} tokens, {s.generation_tps:.1f} tok/s | first token "
              f"{s.first_token_seconds * 1000:.0f} ms | finish: {last.finish_reason}", file=sys.stderr)
        if spec is not None:
            print(f"speculative: {spec.accepted}/{spec.drafted} draft tokens accepted "
                  f"({spec.acceptance:.0%}), {spec.mean_accepted:.2f} per round of {args.num_draft}; per round "
                  f"draft {spec.draft_ms_per_round:.0f} ms + verification {spec.verify_ms_per_round:.0f} ms",
                  file=sys.stderr)
    return 0


def load_draft(args: argparse.Namespace, model):
    """The --draft model: another model, or this one at fewer bits (any-precision directories)."""
    if args.draft is None:
        return None
    from edgelm.errors import EdgelmError
    from edgelm.registry import resolve
    from edgelm.runtime.speculative import check_draft

    if args.draft.isdigit():
        if not resolve(args.model).is_dir():
            raise EdgelmError(f"--draft {args.draft} drafts with this model at {args.draft} bits, which needs an "
                              "any-precision model directory (edgelm quantize --method anyprec -o DIR); or pass "
                              "a smaller model to draft with, e.g. --draft qwen2.5-coder-0.5b-instruct")
        draft, _ = load_model(argparse.Namespace(model=args.model, bits=int(args.draft), device=args.device))
    else:
        draft, _ = load_model(argparse.Namespace(model=args.draft, device=args.device), for_inference=True,
                              kernels_only=True)
    draft.set_kv_bits(args.kv_bits)
    check_draft(model, draft)
    return draft
