"""Sampling from a trained GPT: temperature, top-k and top-p, with a KV cache and CUDA-graph decoding.

The reference implementation's loop, which the KV cache must match: crop to the last context_length
tokens, forward, take the last logits, keep the top k, divide by the temperature, softmax, draw
(argmax when the temperature is 0).
`kv_cache=False` runs exactly that. The cached path prefills the prompt once and then feeds one
token per step; with learned position embeddings the cache cannot grow past context_length, so when
it fills, the last `keep` tokens are prefilled again at positions 0.. and decoding goes on.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tiktoken
import torch

from gpt import checkpoint, tokenizer
from gpt.config import Config, Sampling
from gpt.device import inference_dtype
from gpt.errors import UserError
from gpt.model import GPT, KVCache
from gpt.text import MAX_PROMPT_CHARS, TOO_LONG

STOP_CHECK_EVERY = 16  # steps between host syncs that ask whether every sample has stopped


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids (batch,) drawn from logits (batch, vocab), on the logits' device without a host sync.

    Every id is in [0, vocab) whatever the logits and temperature: where the tempered softmax is not
    finite (a temperature near 0, infinite logits) the row's argmax is taken, the limit of a falling
    temperature.
    """
    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    if sampling.top_k is not None and sampling.top_k < logits.size(-1):
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    greedy = logits.argmax(dim=-1)  # before the temperature, which can overflow every kept logit to inf
    logits = logits / sampling.temperature
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # drop a token once the more likely ones already reach p; the most likely one always stays
        drop_ordered = probs.cumsum(dim=-1) - probs >= sampling.top_p
        drop = torch.empty_like(drop_ordered).scatter_(-1, order, drop_ordered)
        logits = logits.masked_fill(drop, float("-inf"))
    # Inverse-CDF draw: one uniform number a row. Drawing one number per vocabulary entry, as
    # torch.multinomial does, costs milliseconds a token on a CPU and checks the probabilities with
    # host syncs. u stays below the total, so the first cdf entry above u has positive probability.
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, device=total.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, u, right=True)[..., 0]
    # A tiny temperature overflows the scaled logits to inf and the softmax to NaN, where searchsorted
    # answers one past the vocabulary: such rows take the temperature's limit, the argmax (always an
    # id in the vocabulary). Selected on the device: no host sync, and CUDA graphs can capture it.
    usable = torch.isfinite(total[..., 0]) & (total[..., 0] > 0) & (drawn < logits.size(-1))
    return torch.where(usable, drawn, greedy)


class CachedDecoder:
    """Decode steps over a preallocated KV cache: feed `token` at `pos`, sample the next into `token`.

    On CUDA the step (model and sampling, ~15 kernels a layer) is captured once as a CUDA graph and
    replayed: at batch 1, launching those kernels one by one from Python costs more than running them.
    """

    def __init__(self, model: GPT, batch: int, sampling: Sampling, generator: torch.Generator | None, cuda_graph: bool):
        param = next(model.parameters())
        self.model, self.sampling, self.generator, self.device = model, sampling, generator, param.device
        self.cache = KVCache(model.cfg, batch, param.device, param.dtype)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=param.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=param.device)
        self.graph = self._capture() if cuda_graph and param.device.type == "cuda" else None

    def _step(self, generator: torch.Generator | None) -> None:
        logits = self.model.next_logits(self.token, self.cache, self.pos)
        self.token.copy_(sample_next(logits, self.sampling, generator)[:, None])
        self.pos.add_(1)

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        # Capture needs a warm-up on a side stream (cuBLAS handles, allocator pools). It draws from a
        # throwaway generator and writes junk into the first cache slots, which prefill overwrites.
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(torch.Generator(device=self.device))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.generator is not None:  # the default generator is registered by capture itself
                graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph):
                self._step(self.generator)
            return graph
        except RuntimeError as exc:  # an op that cannot be captured: decode eagerly, slower but correct
            warnings.warn(f"CUDA graph capture failed, decoding without it: {exc}", stacklevel=2)
            torch.cuda.synchronize()
            return None

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Fill the cache with tokens (batch, n) at positions 0..n-1; the sampled next token (batch,)."""
        logits = self.model.next_logits(tokens, self.cache, torch.arange(tokens.size(1), device=self.device))
        self.token.copy_(sample_next(logits, self.sampling, self.generator)[:, None])
        self.pos.fill_(tokens.size(1))
        return self.token[:, 0]

    def step(self) -> torch.Tensor:
        """The next token (batch,); the tensor is overwritten by the following step."""
        if self.graph is None:
            self._step(self.generator)
        else:
            self.graph.replay()
        return self.token[:, 0]


@torch.inference_mode()
def decode(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: Sampling,
    num_samples: int = 1,
    *,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
    cuda_graph: bool = True,
    keep: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens (num_samples,) on the model's device; stop early by breaking.

    Random draws come from `generator` (on the model's device), else torch's global generator.
    `keep` is how many tokens the cache keeps when it fills (default half the context): more keeps
    more context per token, fewer re-prefills less often; context_length reproduces the reference.
    """
    context = model.cfg.context_length
    keep = max(1, context // 2) if keep is None else keep
    if not prompt:
        raise UserError("the prompt has no tokens")
    if max_new_tokens < 1 or num_samples < 1:
        raise UserError(f"max tokens and num samples must be at least 1, got {max_new_tokens} and {num_samples}")
    if not 1 <= keep <= context:
        raise UserError(f"keep must be between 1 and the context length {context}, got {keep}")
    device = next(model.parameters()).device
    prompt = list(prompt)[-context:]  # all the reference ever looks at
    seq = torch.empty(num_samples, len(prompt) + max_new_tokens, dtype=torch.long, device=device)
    seq[:, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        decoder = CachedDecoder(model, num_samples, sampling, generator, cuda_graph) if kv_cache else None
        filled = 0  # tokens in the cache, mirrored on the host so no step has to ask the device
        for length in range(len(prompt), seq.size(1)):
            if decoder is None:
                logits = model.next_logits(seq[:, max(0, length - context) : length])
                new = sample_next(logits, sampling, generator)
            elif filled in (0, context):  # the first token, or a full cache: prefill the last window
                filled = length if filled == 0 else keep
                new = decoder.prefill(seq[:, length - filled : length])
            else:
                new = decoder.step()
                filled += 1
            seq[:, length] = new
            yield seq[:, length]
    finally:
        model.train(was_training)


def generate(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: Sampling,
    num_samples: int = 1,
    stop_token: int | None = None,
    **options: Any,
) -> list[list[int]]:
    """num_samples continuations of prompt, each cut before its first stop_token.

    options are decode()'s keywords: generator, kv_cache, cuda_graph, keep.
    """
    steps: list[torch.Tensor] = []
    stopped = None
    for i, new in enumerate(decode(model, prompt, max_new_tokens, sampling, num_samples, **options)):
        steps.append(new)
        if stop_token is not None:
            stopped = new == stop_token if stopped is None else stopped | (new == stop_token)
            # asking the device costs a sync: every few steps is enough, the overshoot is cut below
            if (i + 1) % STOP_CHECK_EVERY == 0 and bool(stopped.all()):
                break
    rows = torch.stack(steps, dim=1).tolist()
    return [row[: row.index(stop_token)] if stop_token in row else row for row in rows]


def stream(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: Sampling,
    stop_token: int | None = None,
    **options: Any,
) -> Iterator[int]:
    """One continuation, token by token as it is generated (a host sync each), ending before stop_token."""
    for new in decode(model, prompt, max_new_tokens, sampling, 1, **options):
        token = int(new[0])
        if token == stop_token:
            return
        yield token


def sample_text(
    model: GPT,
    encoding: tiktoken.Encoding,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """The continuation of prompt as text, ending at <|endoftext|> (the trainer's per-epoch samples)."""
    tokens = generate(
        model,
        encode_prompt(encoding, prompt),
        max_new_tokens,
        Sampling(temperature, top_k, top_p),
        stop_token=encoding.eot_token,
        generator=generator,
    )
    return encoding.decode(tokens[0])


def text_pieces(encoding: tiktoken.Encoding, tokens: Iterator[int]) -> Iterator[str]:
    """Decoded text as tokens arrive; a character split across tokens waits for its last byte."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        piece = decoder.decode(encoding.decode_single_token_bytes(token))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


# ---------------------------------------------------------------- loading and prompts


QUANTIZATIONS = ("none", "int8")


def quantize_int8(model: GPT) -> GPT:
    """`model` with int8 weights in every Linear layer (attention, MLP, LM head), in place: CPU decoding only.

    PyTorch's dynamic quantization (torch.ao.quantization.quantize_dynamic, per-output-channel weight
    scales): weights stored as int8, each activation quantized per row as it arrives, int8 matmuls
    with int32 sums (FBGEMM). Decoding at batch 1 reads every weight once per token, so a quarter of
    fp32's bytes is ~3x the tokens/s on a CPU (bench/generate_speed.py); the logits change slightly,
    so greedy text can differ from fp32's after some tokens. Embeddings and norms stay fp32.
    Raises UserError where this torch has no torch.ao.quantization.
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise UserError(f"--quantize int8 needs torch.ao.quantization, which torch {torch.__version__} lacks") from None
    with warnings.catch_warnings():
        # torch.ao's eager-mode quantization announces its move to the torchao package; it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*", category=UserWarning)
        # in place: a copy would hold the fp32 model twice (650 MB for the reference model) while quantizing
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def check_quantize(quantize: str, device: torch.device) -> None:
    """Raise UserError unless `quantize` is one of QUANTIZATIONS and runs on `device`."""
    if quantize not in QUANTIZATIONS:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}; got {quantize!r}")
    if quantize != "none" and device.type != "cpu":
        raise UserError(f"--quantize {quantize} runs on a CPU only; use --device cpu, or leave it out on {device}")


def load_model(
    path: Path, device: torch.device, tokenizer_file: str | None = None, quantize: str = "none"
) -> tuple[GPT, Config, tiktoken.Encoding, dict[str, object]]:
    """A checkpoint's model (eval mode, in gpt.device.inference_dtype), its config, its tokenizer (from
    tokenizer_file, else $GPT_TIKTOKEN_FILE or a download) and its position (gpt.checkpoint.position).

    quantize "int8": int8 Linear weights (quantize_int8), on a CPU only.
    Raises UserError for a checkpoint that is missing, corrupt, of another tokenizer or of a config
    its weights do not fit, and for a quantize value this device cannot run."""
    check_quantize(quantize, device)
    payload = checkpoint.load(path)
    cfg = checkpoint.config_of(payload, source=f"checkpoint {path}")
    name = (payload.get("tokenizer") or {}).get("name")
    if name != "gpt2":
        raise UserError(f"checkpoint {path} uses tokenizer {name!r}; only 'gpt2' is supported")
    encoding = tokenizer.get_encoding(tokenizer_file)
    if cfg.model.vocab_size < encoding.n_vocab:
        raise UserError(
            f"checkpoint {path}: model.vocab_size {cfg.model.vocab_size} is smaller than the gpt2 "
            f"tokenizer's {encoding.n_vocab} tokens"
        )
    model = GPT(cfg.model)
    checkpoint.load_model_state(model, payload["model"], source=f"checkpoint {path}")
    # on a CPU bf16 matmuls need AVX-512 BF16 or AMX and gained only ~1.2x even there
    # (bench/generate_speed.py): --quantize int8 is the CPU's faster path
    model.to(device=device, dtype=inference_dtype(device)).eval()
    if quantize == "int8":
        model = quantize_int8(model)
    return model, cfg, encoding, checkpoint.position(payload)


def encode_prompt(encoding: tiktoken.Encoding, text: str) -> list[int]:
    """Prompt text -> token ids; empty or absurdly long prompts are UserErrors."""
    if not text.strip():
        raise UserError(
            "the prompt is empty; give --prompt TEXT or --prompt-file FILE "
            f"(for an unconditional sample use --prompt '{tokenizer.ENDOFTEXT}')"
        )
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"the prompt has {len(text):,} characters; {TOO_LONG}")
    return tokenizer.encode(encoding, text)


def generation_record(prompt: str, settings: dict[str, object], samples: list[str]) -> str:
    """The text logged under generations/: settings, prompt and every sample."""
    lines = [f"{key}: {value}" for key, value in settings.items()]
    lines += ["", "=== prompt ===", prompt]
    for number, sample in enumerate(samples, 1):
        lines += ["", f"=== sample {number} ===", sample]
    return "\n".join(lines) + "\n"
