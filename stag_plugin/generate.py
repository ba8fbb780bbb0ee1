"""`stag generate --load CKPT --prompt TEXT`: stream a continuation of a trained checkpoint.

`--load` takes either
  - a training checkpoint (`stag train --save`): the model is rebuilt from the flags stored in
    the checkpoint (single process, TP = PP = 1; the distributed checkpoint is resharded on
    load) and decoded with the Megatron engine (stag_plugin.inference.StagDecoder), or
  - an inference folder (`stag convert to-inference --out`): loaded into the plain-PyTorch
    reference model and decoded with stag_plugin.reference_decode.ReferenceDecoder (no Megatron
    model is built).
The prompt is tokenized with the tokenizer saved next to the weights, so neither the corpus nor
the data cache is needed. Text is printed as it is produced and a summary line (tokens, prefill
time, decode speed, cache sizes) goes to stderr.

    stag generate --load runs/tiny --prompt "def fibonacci(n):" --max-new-tokens 64
    stag generate --load models/tiny --prompt "import " --temperature 0.8 --top-p 0.9 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from stag_plugin import checkpointing
from stag_plugin.cpu_compat import quiet_known_warnings
from stag_plugin.inference import MODES, Sampler, StagDecoder

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 byte sequence decodes to (held back)


class GenerateError(ValueError):
    """Bad input to `stag generate`; the message says what is wrong and how to fix it."""


@dataclass
class LoadedModel:
    """A model ready to decode: a bare StagGPTModel (training checkpoint) or a reference
    StagFormer (inference folder), its tokenizer, and the decode engine that runs it."""

    model: torch.nn.Module
    tokenizer: object
    root: Path
    max_length: int  # most positions the model was trained for (prompt + tokens fed back)
    decoder_class: type  # StagDecoder or ReferenceDecoder: (model, batch, length, mode)
    args: Optional[argparse.Namespace] = None  # the training run's flags (checkpoints only)
    iteration: Optional[int] = None

    @property
    def modes(self) -> tuple:
        return self.decoder_class.MODES


@dataclass
class Generation:
    """What `generate_text` produced."""

    text: str
    token_ids: List[int]
    prompt_ids: List[int]
    stopped: Optional[str]  # "eod", "stop", or None (max_new_tokens / length reached)
    prefill_ms: float
    decode_tokens_per_s: float
    cache_bytes: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"[stag generate] {len(self.token_ids)} tokens | prefill {self.prefill_ms:.1f} ms "
                f"({len(self.prompt_ids)} prompt tokens) | decode "
                f"{self.decode_tokens_per_s:.1f} tokens/s | cache bytes self "
                f"{self.cache_bytes.get('self', 0)} / cross {self.cache_bytes.get('cross', 0)}"
                + (f" | stopped at {self.stopped}" if self.stopped else ""))


# ---------------------------------------------------------------------------- loading


def run_args(root: Path, run: dict) -> argparse.Namespace:
    """The training run's flags for a single-process, weights-only load."""
    from stag_plugin import train

    defaults = vars(train.build_parser().parse_args([]))  # flags newer than the checkpoint
    args = argparse.Namespace(**{**defaults, **run["args"]})
    args.load, args.save = root, None
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    if hasattr(args, "virtual_pipeline_model_parallel_size"):
        args.virtual_pipeline_model_parallel_size = None
    args.sequence_parallel = False
    args.use_distributed_optimizer = False
    return args


def load_model(root: Union[str, Path]) -> LoadedModel:
    """An inference folder, or the latest checkpoint under `root` (weights only), with its
    saved tokenizer."""
    from stag_plugin.inference_folder import CONFIG_FILE

    root = Path(root)
    if (root / CONFIG_FILE).is_file():
        return load_inference_folder(root)
    return load_checkpoint(root)


def load_inference_folder(root: Path) -> LoadedModel:
    """A `stag convert to-inference` folder in the reference model, with its tokenizer."""
    from stag_plugin import inference_folder
    from stag_plugin.data import StagTokenizer
    from stag_plugin.reference_decode import ReferenceDecoder

    loaded = inference_folder.load_inference_folder(root)
    if loaded.tokenizer_path is None:
        raise GenerateError(f"{root} has no {inference_folder.TOKENIZER_FILE}, so the prompt "
                            "cannot be tokenized. Fix: convert the checkpoint again with "
                            "`stag convert to-inference` (it copies the tokenizer)")
    return LoadedModel(loaded.model, StagTokenizer.load(loaded.tokenizer_path), root,
                       loaded.config.max_sequence_length, ReferenceDecoder)


def load_checkpoint(root: Path) -> LoadedModel:
    """Rebuild the latest checkpoint under `root` (weights only) with its saved tokenizer."""
    from stag_plugin import arguments, train
    from stag_plugin.data import StagTokenizer

    iteration, run = checkpointing.read_run(root)  # CheckpointError (a ValueError) names a fix
    tokenizer_file = checkpointing.iteration_dir(root, iteration) / checkpointing.TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise GenerateError(f"{tokenizer_file} is missing, so the prompt cannot be tokenized. "
                            "Fix: load a checkpoint saved by stag train with its tokenizer")
    tokenizer = StagTokenizer.load(tokenizer_file)
    args = run_args(root, run)
    config = arguments.config_from_args(args)
    train.setup_distributed(1, 1, args.distributed_timeout_minutes)
    train.apply_cpu_compat()
    vocab = arguments.padded_vocab_size(tokenizer.vocab_size, args)
    checkpointing.check_architecture(root, arguments.architecture_of(args, vocab))
    model = train.build_model(args, config, vocab)
    train.load_weights(model, root)
    inner = train.unwrap(model[0]).eval()
    return LoadedModel(inner, tokenizer, root,
                       int(args.max_position_embeddings or args.seq_length), StagDecoder,
                       args=args, iteration=iteration)


# ---------------------------------------------------------------------------- decoding


def parse_stops(stops: Optional[Sequence[Union[str, int]]], tokenizer) -> tuple:
    """--stop values -> (token ids, texts). An integer is a token id; a text that is one token
    becomes that id, a longer text stops once the generated text contains it."""
    ids, texts = set(), []
    for stop in stops or ():
        if isinstance(stop, int) or (isinstance(stop, str) and stop.strip().isdigit()):
            token = int(stop)
            if not 0 <= token < tokenizer.vocab_size:
                raise GenerateError(f"--stop {stop} is not a token id of this tokenizer (0.."
                                    f"{tokenizer.vocab_size - 1}). Fix: pass an id in range or "
                                    "a text")
            ids.add(token)
            continue
        if not stop:
            raise GenerateError("--stop '' is empty. Fix: pass a token id or a non-empty text")
        pieces = tokenizer.tokenize(stop)
        if len(pieces) == 1:
            ids.add(pieces[0])
        else:
            texts.append(stop)
    return ids, texts


def generate_text(load: Union[LoadedModel, str, Path], prompt: str, mode: str = "sequential",
                  max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None,
                  seed: Optional[int] = None, stop: Optional[Sequence] = None,
                  stream: Optional[Callable[[str], None]] = None) -> Generation:
    """Decode a continuation of `prompt`; `stream(piece)` receives the text as it is produced
    (the pieces concatenate to the returned text). Raises GenerateError (or another ValueError
    whose message names a fix) for bad input."""
    loaded = load if isinstance(load, LoadedModel) else load_model(load)
    tokenizer = loaded.tokenizer
    if mode not in loaded.modes:
        raise GenerateError(f"--mode {mode!r} is not one of {', '.join(loaded.modes)} for "
                            f"{loaded.root}. Fix: pick one of those")
    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens {max_new_tokens} must be >= 1. Fix: raise it")
    try:
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except ValueError as err:
        raise GenerateError(f"{err}. Fix: pass a valid --temperature/--top-k/--top-p") from err
    prompt_ids = tokenizer.tokenize(prompt)
    if not prompt_ids:
        raise GenerateError("the prompt is empty. Fix: pass a non-empty --prompt TEXT")
    limit = loaded.max_length
    if len(prompt_ids) > limit:
        raise GenerateError(f"the prompt is {len(prompt_ids)} tokens but the model holds at most "
                            f"{limit} positions. Fix: shorten --prompt to at most {limit} tokens")
    stop_ids, stop_texts = parse_stops(stop, tokenizer)
    stop_ids.add(tokenizer.eod)
    # n new tokens feed n - 1 of them back: prompt + n - 1 positions
    new_tokens = min(max_new_tokens, limit - len(prompt_ids) + 1)
    try:
        decoder = loaded.decoder_class(loaded.model, max_batch_size=1,
                              max_sequence_length=len(prompt_ids) + new_tokens - 1 or 1,
                              mode=mode)
    except ValueError as err:
        message = str(err)
        if "Fix:" not in message:
            message += ". Fix: use --mode sequential"
        raise GenerateError(message) from err

    vocab = tokenizer.vocab_size
    streamer = _Streamer(tokenizer, stream)
    ids: List[int] = []
    stopped = None
    step_seconds = 0.0
    with torch.no_grad():
        start = time.perf_counter()
        logits = decoder.prefill(torch.tensor([prompt_ids]))
        prefill_seconds = time.perf_counter() - start
        for n in range(new_tokens):
            tick = time.perf_counter()
            token = int(sampler(logits[:, :vocab])[0])
            if token == tokenizer.eod:
                stopped = "eod"
                break
            ids.append(token)
            text = streamer.update(ids)
            if token in stop_ids:
                stopped = "stop"
            elif any(s in text for s in stop_texts):
                stopped = "stop"
            if stopped or n == new_tokens - 1:
                step_seconds += time.perf_counter() - tick
                break
            logits = decoder.step(torch.tensor([token]))
            step_seconds += time.perf_counter() - tick
    text = streamer.finish(ids)
    decoded = max(len(ids) - 1, 0)  # tokens that needed a decode step
    return Generation(text=text, token_ids=ids, prompt_ids=prompt_ids, stopped=stopped,
                      prefill_ms=prefill_seconds * 1e3,
                      decode_tokens_per_s=decoded / step_seconds if step_seconds > 0 else 0.0,
                      cache_bytes=decoder.cache_bytes())


class _Streamer:
    """Emits the new suffix of detokenize(ids) each step, holding back a trailing incomplete
    multi-byte character (decoded as U+FFFD) until its last byte arrives."""

    def __init__(self, tokenizer, sink: Optional[Callable[[str], None]]):
        self.tokenizer, self.sink, self.emitted = tokenizer, sink, ""

    def update(self, ids: List[int]) -> str:
        text = self.tokenizer.detokenize(ids)
        stable = text.rstrip(REPLACEMENT)
        self._emit(stable)
        return text

    def finish(self, ids: List[int]) -> str:
        text = self.tokenizer.detokenize(ids)
        self._emit(text)
        return self.emitted if not text.startswith(self.emitted) else text

    def _emit(self, text: str) -> None:
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            piece = text[len(self.emitted):]
            self.emitted = text
            if self.sink is not None:
                self.sink(piece)


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stag generate", description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=Path, required=True,
                        help="training checkpoint folder (stag train --save) or inference "
                             "folder (stag convert to-inference --out)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--mode", default="sequential", choices=MODES,
                        help="decode engine mode; batched / recurrent need shared weights; "
                             "pipeline needs torchrun (not this command); inference folders "
                             "decode sequential / batched / recurrent")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--stop", nargs="+", default=None, metavar="TEXT_OR_ID",
                        help="stop after any of these token ids or texts (EOD always stops)")
    return parser


def main(argv=None) -> int:
    quiet_known_warnings()
    options = build_parser().parse_args(argv)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        result = generate_text(options.load, options.prompt, mode=options.mode,
                               max_new_tokens=options.max_new_tokens,
                               temperature=options.temperature, top_k=options.top_k,
                               top_p=options.top_p, seed=options.seed, stop=options.stop,
                               stream=stream)
    except ValueError as err:
        message = str(err)
        if "Fix:" not in message:
            message += ". Fix: check the flags (stag generate --help)"
        print(f"stag generate: error: {message}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(result.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
