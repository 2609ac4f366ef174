"""Continue a prompt with a tracked run's model: `python generate.py --help` shows the options."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gpt import env
from gpt.cli import (
    CONTEXT,
    Command,
    FiniteFloat,
    UserPath,
    cache_dir_option,
    device_option,
    friendly_errors,
    tokenizer_file_option,
    tracking_uri_option,
)
from gpt.config import Sampling
from gpt.errors import UserError, check_file
from gpt.text import read_prompt

if TYPE_CHECKING:
    import tiktoken

    from gpt.model import GPT


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--run", "run_id", help="MLflow run id whose checkpoint to sample from.")
@click.option(
    "--checkpoint",
    default="best",
    show_default=True,
    help="best, last, an artifact path in the run, or a local .pt file (then --run may be left out).",
)
@click.option(
    "--model",
    "model_uri",
    metavar="URI",
    help="A logged MLflow Model instead of a run's checkpoint: models:/NAME/1, models:/NAME@alias, runs:/<id>/model.",
)
@click.option("--prompt", help="Text to continue.")
@click.option("--prompt-file", type=UserPath(dir_okay=False), help="Read the prompt from a UTF-8 file instead.")
@click.option("--max-tokens", type=int, default=100, show_default=True, help="New tokens per sample, at most.")
@click.option(
    "--temperature", type=FiniteFloat(min=0), default=1.0, show_default=True, help="0 means greedy (argmax)."
)
@click.option("--top-k", type=int, help="Sample among the k most likely tokens only.")
@click.option(
    "--top-p",
    type=FiniteFloat(min=0, max=1, min_open=True),
    help="Sample among the most likely tokens whose probability reaches p.",
)
@click.option("--num-samples", type=int, default=1, show_default=True, help="Continuations, generated as a batch.")
@click.option(
    "--seed", type=click.IntRange(0, 2**32 - 1), help="Same seed, same text (default: a random seed, printed)."
)
@device_option
@click.option("--stream", is_flag=True, help="Print tokens as they are generated (one sample).")
@click.option("--no-echo", is_flag=True, help="Print only the continuations, not the prompt and the markers.")
@click.option("--no-kv-cache", is_flag=True, help="Recompute the whole window for every token (the reference).")
@click.option(
    "--cache-keep",
    type=click.IntRange(min=1),
    help="Tokens the KV cache keeps when it fills (default half the context length); the context length "
    "gives --no-kv-cache's text, at a full re-prefill per token.",
)
@click.option("--no-cuda-graph", is_flag=True, help="Decode without CUDA graphs on a GPU.")
@click.option(
    "--quantize",
    type=click.Choice(["none", "int8"]),  # gpt.sampling.QUANTIZATIONS, spelled out so --help needs no import
    default="none",
    show_default=True,
    help="int8: int8 weights in the linear layers (CPU only): ~3x faster for the 162M reference model, no faster "
    "for tiny ones; the text can differ from fp32's.",
)
@click.option("--log", "log_to_run", is_flag=True, help="Save prompt, settings and text to the run's generations/.")
@tracking_uri_option
@tokenizer_file_option
@cache_dir_option
@friendly_errors
def main(run_id, checkpoint, model_uri, prompt, prompt_file, max_tokens, temperature, top_k, top_p, num_samples, seed,
         device, stream, no_echo, no_kv_cache, cache_keep, no_cuda_graph, quantize, log_to_run, tracking_uri,
         tokenizer_file, cache_dir):  # fmt: skip
    """Continue a prompt with the model of a tracked training run.

    \b
    python generate.py --run <run_id> --prompt "Dobby is"
    python generate.py --run <run_id> --checkpoint last --prompt-file chapter.txt --stream
    python generate.py --checkpoint path/to/best.pt --prompt "Alice was" --temperature 0
    python generate.py --model models:/my-gpt/1 --prompt "Alice was"

    The prompt is printed first (as the model sees it), then each continuation, each under a
    `=== ... ===` line; --no-echo prints the continuations alone.
    """
    # every check that needs no model runs first, so a typo costs no loading time
    settings = Sampling(temperature, top_k, top_p)
    checkpoint = os.path.expanduser(checkpoint)  # a local file: `~` as a shell reads it
    _check_options(run_id, checkpoint, max_tokens, num_samples, stream, log_to_run, model_uri,
                   no_kv_cache and cache_keep)  # fmt: skip
    text = read_prompt(prompt, prompt_file)

    import torch  # the heavy imports come once the options are known to be sound

    from gpt import runs, sampling
    from gpt.device import resolve_device

    torch_device = resolve_device(device or "auto", option="--device")
    sampling.check_quantize(quantize, torch_device)
    cache = Path(cache_dir).expanduser() if cache_dir else env.cache_dir()
    if model_uri:
        from gpt.logged_model import load_model_uri

        model, cfg, encoding, info = load_model_uri(model_uri, torch_device, tracking_uri)
        if quantize == "int8":
            model = sampling.quantize_int8(model)
        path, run_id = model_uri, info["run_id"]  # --log writes to the run that logged the model
    else:
        path = runs.find_checkpoint(run_id, checkpoint, tracking_uri, cache) if run_id else Path(checkpoint)
        model, cfg, encoding, info = sampling.load_model(path, torch_device, tokenizer_file, quantize)
        if run_id and info["run_id"] not in (None, run_id):
            raise UserError(f"checkpoint {path} belongs to run {info['run_id']}, not to run {run_id}")
    if log_to_run:  # before the text is generated: a store that cannot take it fails first
        runs.check_run_store(run_id, tracking_uri, "logging")
    context = cfg.model.context_length
    if cache_keep is not None and cache_keep > context:
        raise UserError(f"--cache-keep must be at most the model's context length {context}, got {cache_keep}")
    ids = sampling.encode_prompt(encoding, text)
    seed = secrets.randbelow(2**31) if seed is None else seed
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    click.echo(f"{path}: epoch {info['epoch']}, {cfg.model.n_layers} layers, on {torch_device}, seed {seed}", err=True)
    if len(ids) > context:
        click.echo(f"the prompt has {len(ids)} tokens; the model sees the last {context}", err=True)
    if not no_echo:
        click.echo(f"=== prompt ===\n{_seen(encoding, ids, context)}")

    options = {"generator": generator, "kv_cache": not no_kv_cache, "cuda_graph": not no_cuda_graph, "keep": cache_keep}
    start = time.perf_counter()
    rows = _sample(model, encoding, ids, max_tokens, settings, num_samples, stream, options, not no_echo)
    seconds = time.perf_counter() - start
    count = sum(len(row) for row in rows)
    weights = " with int8 weights" if quantize == "int8" else ""
    click.echo(f"{count} tokens in {seconds:.2f} s ({count / seconds:,.1f} tokens/s){weights}", err=True)

    if log_to_run:
        settings_used = {"run": run_id, "checkpoint": str(path), "max_tokens": max_tokens, "temperature": temperature,
                         "top_k": top_k, "top_p": top_p, "num_samples": num_samples, "seed": seed,
                         "device": str(torch_device), "kv_cache": not no_kv_cache,
                         "cache_keep": cache_keep, "quantize": quantize}  # fmt: skip
        _log(run_id, tracking_uri, text, settings_used, [encoding.decode(row) for row in rows])


def _log(run_id: str, tracking_uri: str | None, prompt: str, settings: dict[str, Any], samples: list[str]) -> None:
    """--log: the prompt, the settings and the samples as a text file under the run's generations/."""
    from gpt import runs, sampling

    artifact = f"generations/{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}.txt"
    runs.log_text(run_id, artifact, sampling.generation_record(prompt, settings, samples), tracking_uri)
    click.echo(f"logged {artifact} to run {run_id}", err=True)


def _seen(encoding: tiktoken.Encoding, ids: list[int], context: int) -> str:
    """The prompt as the model sees it: its last `context` tokens, after '...' when it was cut."""
    return encoding.decode(ids) if len(ids) <= context else "..." + encoding.decode(ids[-context:])


def _check_options(
    run_id: str | None,
    checkpoint: str,
    max_tokens: int,
    num_samples: int,
    stream: bool,
    log_to_run: bool,
    model_uri: str | None = None,
    keep_without_cache: bool = False,
) -> None:
    """The option combinations that make no sense, each a UserError that says what to give instead."""
    if keep_without_cache:
        raise UserError("--cache-keep sets what the KV cache keeps; drop it or --no-kv-cache")
    if max_tokens < 1 or num_samples < 1:
        raise UserError(f"--max-tokens and --num-samples must be at least 1, got {max_tokens} and {num_samples}")
    if stream and num_samples > 1:
        raise UserError(f"--stream prints one sample as it is generated; use --num-samples 1 (got {num_samples})")
    if model_uri:
        if run_id or checkpoint != "best":
            raise UserError("--model samples from a logged MLflow Model: drop --run and --checkpoint")
        return
    if run_id is None and checkpoint in ("best", "last"):
        raise UserError(
            f"give --run RUN_ID (--checkpoint {checkpoint} means that run's checkpoints/{checkpoint}.pt) or --model URI"
        )
    if run_id is None:
        missing = f"give --run RUN_ID, or --checkpoint naming a local .pt file (there is no file {checkpoint!r})"
        check_file(Path(checkpoint).expanduser(), "--checkpoint", missing)
    if run_id is None and log_to_run:
        raise UserError("--log adds the text to a run: give --run RUN_ID")


def _sample(
    model: GPT,
    encoding: tiktoken.Encoding,
    ids: list[int],
    max_tokens: int,
    settings: Sampling,
    num_samples: int,
    stream: bool,
    options: dict[str, Any],
    marked: bool,
) -> list[list[int]]:
    """Generate and print the samples (streamed token by token with --stream); their token ids.

    marked: each sample under a `=== continuation ===` (or `=== sample i/n ===`) line; else several
    samples are separated by such lines and one is printed bare.
    """
    from gpt import sampling

    eot = encoding.eot_token
    if stream:
        if marked:
            click.echo("=== continuation ===")
        tokens: list[int] = []
        pieces = sampling.stream(model, ids, max_tokens, settings, stop_token=eot, **options)
        for piece in sampling.text_pieces(encoding, _collect(pieces, tokens)):
            click.echo(piece, nl=False)  # click.echo flushes, so each piece shows at once
        click.echo()
        return [tokens]
    rows = sampling.generate(model, ids, max_tokens, settings, num_samples, stop_token=eot, **options)
    for number, row in enumerate(rows, 1):
        if num_samples > 1:
            click.echo(f"=== sample {number}/{num_samples} ===")
        elif marked:
            click.echo("=== continuation ===")
        click.echo(encoding.decode(row))
    return rows


def _collect(tokens: Iterator[int], into: list[int]) -> Iterator[int]:
    """Pass tokens through, keeping a copy (the streamed sample is also logged)."""
    for token in tokens:
        into.append(token)
        yield token


if __name__ == "__main__":
    main()
