"""Continue a prompt with a tracked run's model: `python generate.py --help` shows the options."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import click
import torch

from gpt import runs, sampling
from gpt.cli import Command, friendly_errors
from gpt.errors import UserError
from gpt.trainer import resolve_device


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--run", "run_id", help="MLflow run id whose checkpoint to sample from.")
@click.option(
    "--checkpoint",
    default="best",
    show_default=True,
    help="best, last, an artifact path in the run, or a local .pt file (then --run may be left out).",
)
@click.option("--prompt", help="Text to continue.")
@click.option("--prompt-file", help="Read the prompt from a UTF-8 file instead.")
@click.option("--max-tokens", type=int, default=100, show_default=True, help="New tokens per sample, at most.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 means greedy (argmax).")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens only.")
@click.option("--top-p", type=float, help="Sample among the most likely tokens whose probability reaches p.")
@click.option("--num-samples", type=int, default=1, show_default=True, help="Continuations, generated as a batch.")
@click.option("--seed", type=int, help="Same seed, same text (default: a random seed, printed).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated (one sample).")
@click.option("--no-kv-cache", is_flag=True, help="Recompute the whole window for every token (the reference).")
@click.option("--no-cuda-graph", is_flag=True, help="Decode without CUDA graphs on a GPU.")
@click.option(
    "--quantize",
    type=click.Choice(["none", "int8"]),  # gpt.sampling.QUANTIZATIONS, spelled out so --help needs no import
    default="none",
    show_default=True,
    help="int8: int8 weights in the linear layers, ~3x faster on a CPU; the text can differ from fp32's.",
)
@click.option("--log", "log_to_run", is_flag=True, help="Save prompt, settings and text to the run's generations/.")
@click.option(
    "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)."
)
@friendly_errors
def main(
    run_id,
    checkpoint,
    prompt,
    prompt_file,
    max_tokens,
    temperature,
    top_k,
    top_p,
    num_samples,
    seed,
    device,
    stream,
    no_kv_cache,
    no_cuda_graph,
    quantize,
    log_to_run,
    tracking_uri,
):
    """Continue a prompt with the model of a tracked training run.

    \b
    python generate.py --run <run_id> --prompt "Dobby is"
    python generate.py --run <run_id> --checkpoint last --prompt-file chapter.txt --stream
    python generate.py --checkpoint path/to/best.pt --prompt "Alice was" --temperature 0
    """
    # every check that needs no model runs first, so a typo costs no loading time
    settings = sampling.Sampling(temperature, top_k, top_p)
    if max_tokens < 1 or num_samples < 1:
        raise UserError(f"--max-tokens and --num-samples must be at least 1, got {max_tokens} and {num_samples}")
    if stream and num_samples > 1:
        raise UserError(f"--stream prints one sample as it is generated; use --num-samples 1 (got {num_samples})")
    if run_id is None and checkpoint in ("best", "last"):
        raise UserError(f"give --run RUN_ID: --checkpoint {checkpoint} means that run's checkpoints/{checkpoint}.pt")
    if run_id is None and not Path(checkpoint).is_file():
        raise UserError(f"give --run RUN_ID, or --checkpoint naming a local .pt file (there is no file {checkpoint!r})")
    if run_id is None and log_to_run:
        raise UserError("--log adds the text to a run: give --run RUN_ID")
    text = sampling.read_prompt(prompt, prompt_file)
    torch_device = resolve_device(device, option="--device")
    sampling.check_quantize(quantize, torch_device)

    path = runs.find_checkpoint(run_id, checkpoint, tracking_uri) if run_id else Path(checkpoint)
    model, cfg, encoding, info = sampling.load_model(path, torch_device, quantize)
    if run_id and info["run_id"] not in (None, run_id):
        raise UserError(f"checkpoint {path} belongs to run {info['run_id']}, not to run {run_id}")
    ids = sampling.encode_prompt(encoding, text)
    seed = secrets.randbelow(2**31) if seed is None else seed
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    click.echo(f"{path}: epoch {info['epoch']}, {cfg.model.n_layers} layers, on {torch_device}, seed {seed}", err=True)
    if len(ids) > cfg.model.context_length:
        click.echo(f"the prompt has {len(ids)} tokens; the model sees the last {cfg.model.context_length}", err=True)

    options = {"generator": generator, "kv_cache": not no_kv_cache, "cuda_graph": not no_cuda_graph}
    eot = encoding.eot_token
    start = time.perf_counter()
    if stream:
        tokens: list[int] = []
        pieces = sampling.stream(model, ids, max_tokens, settings, stop_token=eot, **options)
        for piece in sampling.text_pieces(encoding, _collect(pieces, tokens)):
            click.echo(piece, nl=False)  # click.echo flushes, so each piece shows at once
        click.echo()
        rows = [tokens]
    else:
        rows = sampling.generate(model, ids, max_tokens, settings, num_samples, stop_token=eot, **options)
        for number, row in enumerate(rows, 1):
            if num_samples > 1:
                click.echo(f"--- sample {number}/{num_samples} ---")
            click.echo(encoding.decode(row))
    seconds = time.perf_counter() - start
    count = sum(len(row) for row in rows)
    click.echo(f"{count} tokens in {seconds:.2f} s ({count / seconds:,.1f} tokens/s)", err=True)

    if log_to_run:
        record = {
            "run": run_id,
            "checkpoint": str(path),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "num_samples": num_samples,
            "seed": seed,
            "device": str(torch_device),
            "kv_cache": not no_kv_cache,
            "quantize": quantize,
        }
        samples = [encoding.decode(row) for row in rows]
        artifact = f"generations/{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}.txt"
        runs.log_text(run_id, artifact, sampling.generation_record(text, record, samples), tracking_uri)
        click.echo(f"logged {artifact} to run {run_id}", err=True)


def _collect(tokens: Iterator[int], into: list[int]) -> Iterator[int]:
    """Pass tokens through, keeping a copy (the streamed sample is also logged)."""
    for token in tokens:
        into.append(token)
        yield token


if __name__ == "__main__":
    main()
