"""llmctl sample: generate text from a checkpoint, streamed to stdout."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from ..core.errors import LlmctlError
from ._common import (
    checkpoint_argument,
    device_option,
    dtype_option,
    load_for_inference,
    model_path_option,
    user_errors,
)

_SAMPLING = "Sampling"


def sample(
    ckpt: Path | None = checkpoint_argument(),
    model_path: Path | None = model_path_option(),
    prompt: str = typer.Option(
        "Once upon a time", "--prompt", "-p",
        help="Text to continue ('' starts from end-of-text; '-' reads stdin)."),
    prompt_file: str | None = typer.Option(
        None, "--prompt_file", metavar="PATH", show_default=False,
        help="Read the prompt from a UTF-8 file ('-' = stdin); wins over --prompt."),
    max_new_tokens: int = typer.Option(
        300, "--max_new_tokens", min=0, rich_help_panel=_SAMPLING,
        help="Tokens to generate per sample (fewer when end-of-text stops it)."),
    temperature: float = typer.Option(
        0.9, "--temperature", "-t", rich_help_panel=_SAMPLING,
        help="Softmax temperature: 0 = greedy (argmax), else 0.001 to 100."),
    top_k: int = typer.Option(
        200, "--top_k", min=0, rich_help_panel=_SAMPLING,
        help="Sample among the k most likely tokens only (0 = off)."),
    top_p: float | None = typer.Option(
        None, "--top_p", min=0.0, max=1.0, show_default=False,
        rich_help_panel=_SAMPLING,
        help="Nucleus sampling: the smallest set of tokens holding probability p (default off)."),
    num_samples: int = typer.Option(
        1, "--num_samples", "-n", min=1, rich_help_panel=_SAMPLING,
        help="Independent samples to draw from the prompt."),
    seed: int | None = typer.Option(
        None, "--seed", show_default=False, rich_help_panel=_SAMPLING,
        help="Random seed: the same seed gives the same text (default: a fresh one)."),
    stop_at_eot: bool = typer.Option(
        True, "--stop_at_eot/--no_stop_at_eot",
        rich_help_panel=_SAMPLING, help="Stop a sample at the end-of-text token."),
    speculative: bool = typer.Option(
        False, "--speculative", rich_help_panel=_SAMPLING,
        help="Self-speculative decoding (a model trained with mtp_depth >= 1): the MTP "
        "modules draft tokens, one main-model forward verifies them. Greedy output is token "
        "for token plain greedy's; sampled output follows the main model's distribution. "
        "Reports the acceptance rate and the speed-up over plain decoding (timed by also "
        "decoding as many tokens plainly)."),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object with every sample instead of streaming."),
    device: str = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Generate text from a checkpoint with its own tokenizer, using the KV cache."""
    from ..infer.load import checkpoint_argument
    from ..infer.sample import SampleSettings, encode_prompt, read_prompt

    with user_errors():
        path = checkpoint_argument(ckpt, model_path)
        text = read_prompt(prompt, prompt_file)
        settings = SampleSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k or None, top_p=top_p, num_samples=num_samples,
                                  seed=seed, stop_at_eot=stop_at_eot,
                                  speculative=speculative)
        settings.check()
        loaded = load_for_inference(path, device=device, dtype=dtype)
        if speculative and not len(getattr(loaded.model, "mtp", ())):
            raise LlmctlError("--speculative needs a checkpoint trained with mtp_depth >= 1 "
                              f"({path} has no multi-token prediction modules)")
        tokens = encode_prompt(loaded.tokenizer, text, loaded.block_size)
        if tokens.dropped:
            typer.echo(f"warning: the prompt is {tokens.dropped + len(tokens.ids)} tokens, "
                       f"longer than block_size {loaded.block_size}; the model sees only its "
                       f"last {len(tokens.ids)}", err=True)
        try:
            samples = _run(loaded, tokens, settings, as_json)
        except BrokenPipeError:  # e.g. piped into `head`: the reader is gone, stop quietly
            # point stdout at devnull so the interpreter's final flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
    if as_json:
        typer.echo(json.dumps({
            "checkpoint": str(loaded.info.path), "step": loaded.info.step,
            "prompt": text, "prompt_tokens": len(tokens.ids), "prompt_cropped": tokens.dropped,
            "settings": {k: getattr(settings, k) for k in (
                "max_new_tokens", "temperature", "top_k", "top_p", "num_samples", "seed",
                "stop_at_eot", "speculative")},
            "samples": [s.to_dict() for s in samples],
        }, ensure_ascii=False))


def _run(loaded, tokens, settings, as_json: bool) -> list:
    """Stream each sample (prompt echoed, then the continuation) to stdout unless --json;
    the speed of each to stderr."""
    from ..infer.sample import generate_samples

    out = sys.stdout

    def emit(_index: int, piece: str) -> None:
        out.write(piece)
        out.flush()

    if not as_json:
        emit(0, tokens.text)
    samples = []
    for sample in generate_samples(loaded, tokens, settings, on_text=None if as_json else emit):
        if not as_json:
            more = sample.index + 1 < settings.num_samples
            emit(sample.index, "\n" + ("---------------\n" + tokens.text if more else ""))
        seed = f", seed {settings.seed}" if sample.index == 0 else ""
        typer.echo(f"[sample {sample.index + 1}/{settings.num_samples}: "
                   f"{len(sample.token_ids)} tokens in {sample.seconds:.2f} s, "
                   f"{sample.tokens_per_s:.1f} tokens/s, stopped at {sample.stop_reason}{seed}]",
                   err=True)
        if sample.speculative:
            spec = sample.speculative
            typer.echo(f"[speculative: acceptance rate {spec['acceptance_rate']:.2f} "
                       f"({spec['accepted']}/{spec['drafted']} drafts), "
                       f"{spec['tokens_per_forward']:.2f} tokens per main forward, "
                       f"speed-up {spec['speedup']:.2f}x over plain decoding "
                       f"({spec['plain_seconds']:.2f} s)]", err=True)
        samples.append(sample)
    return samples
