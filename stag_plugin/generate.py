"""`stag generate --load CKPT --prompt TEXT`: stream a continuation of a trained checkpoint.

`--load` takes either
  - a training checkpoint (`stag train --save`): the model is rebuilt from the flags stored in
    the checkpoint (single process, TP = PP = 1; the distributed checkpoint is resharded on
    load) and decoded with the Megatron engine (stag_plugin.decode.engine.StagDecoder), or
  - an inference folder (`stag convert to-inference --out`): loaded into the plain-PyTorch
    reference model and decoded with stag_plugin.reference.decode.ReferenceDecoder (no Megatron
    model is built).
Either runs on the GPU when there is one (Megatron builds the checkpoint's model there; an
inference folder is loaded there), else on the CPU.
The prompt is tokenized with the tokenizer saved next to the weights (any --tokenizer-type; a
NullTokenizer's prompt is whitespace-separated ids), so neither the corpus nor the data cache is
needed. Text is printed as it is produced and a summary line (tokens, prefill
time, decode speed, cache sizes) goes to stderr.

Decoding options, passed to either engine as `compile=`, `cuda_graph=`, `dtype=`: `--mode
batched` (every section of a step in one pass; any weights), `--compile` (torch.compile of the
fixed-shape step), `--cuda-graph` (the step replayed as a CUDA graph; GPU only), `--dtype
{fp32,bf16}` (default: the weights' dtype). The Megatron engine runs compiled / graph steps in
modes batched and recurrent only, and refuses them in mode sequential.

    stag generate --load runs/tiny --prompt "def fibonacci(n):" --max-new-tokens 64
    stag generate --load models/tiny --prompt "import " --temperature 0.8 --top-p 0.9 --seed 1
    stag generate --load models/tiny --prompt "import " --mode batched --dtype bf16 --cuda-graph
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from stag_plugin.decode.engine import MODES, StagDecoder
from stag_plugin.decode.text import Generation, continue_text
from stag_plugin.errors import StagError
from stag_plugin.reference.sampling import Sampler
from stag_plugin.training import arguments, checkpointing, runtime

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --dtype


class GenerateError(StagError):
    """Bad input to `stag generate`."""


@dataclass
class LoadedModel:
    """A model ready to decode: a bare StagGPTModel (training checkpoint) or a reference
    StagFormer (inference folder), its tokenizer, and the decode engine that runs it."""

    model: torch.nn.Module
    tokenizer: object
    root: Path
    max_length: int  # most positions the model was trained for (prompt + tokens fed back)
    decoder_class: type  # StagDecoder or ReferenceDecoder: (model, batch, length, mode,
    #                      compile=, cuda_graph=, dtype=)
    args: Optional[argparse.Namespace] = None  # the training run's flags (checkpoints only)
    iteration: Optional[int] = None

    @property
    def modes(self) -> tuple:
        return self.decoder_class.MODES

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# ---------------------------------------------------------------------------- loading


def load_model(root: Union[str, Path], trusted: bool = False) -> LoadedModel:
    """An inference folder, or the latest checkpoint under `root` (weights only), with its
    saved tokenizer."""
    from stag_plugin.convert.inference_folder import CONFIG_FILE

    root = Path(root)
    if (root / CONFIG_FILE).is_file():
        return load_inference_folder(root)
    return load_checkpoint(root, trusted)


def load_inference_folder(root: Path) -> LoadedModel:
    """A `stag convert to-inference` folder in the reference model, with its tokenizer
    (`tokenizer/`, or the `tokenizer.model` of folders converted before tokenizer types)."""
    from stag_plugin.convert import inference_folder
    from stag_plugin.reference.decode import ReferenceDecoder

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where Megatron builds checkpoints
    loaded = inference_folder.load_inference_folder(root, device=device)
    tokenizer = _saved_tokenizer(root, loaded.metadata.get("tokenizer_file",
                                                           inference_folder.TOKENIZER_FILE),
                                 "convert the checkpoint again with `stag convert "
                                 "to-inference` (it copies the tokenizer)")
    return LoadedModel(loaded.model, tokenizer, root, loaded.config.max_sequence_length,
                       ReferenceDecoder)


def _saved_tokenizer(folder: Path, legacy_file: str, fix: str):
    """The tokenizer saved in `folder` (data.tokenizers.load_saved), or a GenerateError."""
    from stag_plugin.training.data import tokenizers

    if (tokenizers.saved_tokenizer_folder(folder) is None
            and not (Path(folder) / legacy_file).is_file()):
        raise GenerateError(f"{folder} holds no tokenizer ({tokenizers.CHECKPOINT_DIR}/ or "
                            f"{legacy_file}), so the prompt cannot be tokenized", fix)
    return tokenizers.load_saved(folder, legacy_file)


def load_checkpoint(root: Path, trusted: bool = False) -> LoadedModel:
    """Rebuild the latest checkpoint under `root` (weights only, one process) with its saved
    tokenizer."""
    iteration, run = checkpointing.read_run(root)
    tokenizer = _saved_tokenizer(checkpointing.iteration_dir(root, iteration),
                                 checkpointing.TOKENIZER_FILE, "load a checkpoint saved by "
                                 "stag train with its tokenizer")
    args = runtime.saved_args(run)
    runtime.start(1, 1, args.distributed_timeout_minutes)
    vocab = arguments.padded_vocab_size(tokenizer.vocab_size, args)
    checkpointing.check_architecture(root, arguments.architecture_of(args, vocab))
    model = runtime.build_model(args, vocab)
    runtime.load_weights(model, root, trusted)
    return LoadedModel(runtime.unwrap(model[0]).eval(), tokenizer, root,
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
                                    f"{tokenizer.vocab_size - 1})", "pass an id in range or "
                                    "a text")
            ids.add(token)
            continue
        if not stop:
            raise GenerateError("--stop '' is empty", "pass a token id or a non-empty text")
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
                  stream: Optional[Callable[[str], None]] = None, compile: bool = False,
                  cuda_graph: bool = False, dtype: Optional[str] = None) -> Generation:
    """Decode a continuation of `prompt`; `stream(piece)` receives the text as it is produced
    (the pieces concatenate to the returned text). `compile`, `cuda_graph` and `dtype` (None,
    or a name of DTYPES) go to the decoder. Bad input raises a StagError."""
    loaded = load if isinstance(load, LoadedModel) else load_model(load)
    if mode not in loaded.modes:
        raise GenerateError(f"--mode {mode!r} is not one of {', '.join(loaded.modes)} for "
                            f"{loaded.root}", "pick one of those")
    check_decoding(loaded, cuda_graph, dtype)
    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens {max_new_tokens} must be >= 1", "raise it")
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    prompt_ids = loaded.tokenizer.tokenize(prompt)
    if not prompt_ids:
        raise GenerateError("the prompt is empty", "pass a non-empty --prompt TEXT")
    limit = loaded.max_length
    if len(prompt_ids) > limit:
        raise GenerateError(f"the prompt is {len(prompt_ids)} tokens but the model holds at most "
                            f"{limit} positions", f"shorten --prompt to at most {limit} tokens")
    stop_ids, stop_texts = parse_stops(stop, loaded.tokenizer)
    # n new tokens feed n - 1 of them back: prompt + n - 1 positions
    new_tokens = min(max_new_tokens, limit - len(prompt_ids) + 1)
    decoder = loaded.decoder_class(loaded.model, max_batch_size=1,
                                   max_sequence_length=len(prompt_ids) + new_tokens - 1 or 1,
                                   mode=mode, compile=compile, cuda_graph=cuda_graph,
                                   dtype=None if dtype is None else DTYPES[dtype])
    return continue_text(decoder, loaded.tokenizer, prompt_ids, new_tokens, sampler, stop_ids,
                         stop_texts, stream)


def check_decoding(loaded: LoadedModel, cuda_graph: bool, dtype: Optional[str]) -> None:
    """Refuse decoding options this model or machine cannot take, naming the flag."""
    if cuda_graph and loaded.device.type != "cuda":
        raise GenerateError(f"--cuda-graph captures the decode step as a CUDA graph, and the "
                            f"model is on {loaded.device} (no GPU here)", "drop --cuda-graph "
                            "(--compile works on the CPU)")
    if dtype is not None and dtype not in DTYPES:
        raise GenerateError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}",
                            "pick one of those, or leave it out (the weights' dtype)")


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stag generate", description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=Path, required=True,
                        help="training checkpoint folder (stag train --save) or inference "
                             "folder (stag convert to-inference --out)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    arguments.add_trust_arg(parser)
    parser.add_argument("--mode", default="sequential", choices=MODES,
                        help="decode mode: sequential, batched (every section of a step in one "
                             "pass; any weights) or recurrent (shared weights). One section "
                             "per pipeline rank is stag_plugin.decode.pipeline under torchrun, "
                             "not this command")
    parser.add_argument("--compile", action="store_true",
                        help="run the fixed-shape decode step under torch.compile (checkpoints: "
                             "modes batched / recurrent)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the decode step as a CUDA graph (GPU only; checkpoints: "
                             "modes batched / recurrent)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="decode in this dtype (default: the weights' dtype)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--stop", nargs="+", default=None, metavar="TEXT_OR_ID",
                        help="stop after any of these token ids or texts (EOD always stops)")
    return parser


def main(argv) -> int:
    """`stag generate` (stag_plugin.cli prints a StagError as one `error: ... Fix: ...` line)."""
    options = build_parser().parse_args(argv)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    loaded = load_model(options.load, trusted=options.trust_checkpoint_code)
    result = generate_text(loaded, options.prompt, mode=options.mode,
                           max_new_tokens=options.max_new_tokens,
                           temperature=options.temperature, top_k=options.top_k,
                           top_p=options.top_p, seed=options.seed, stop=options.stop,
                           stream=stream, compile=options.compile,
                           cuda_graph=options.cuda_graph, dtype=options.dtype)
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(result.summary(), file=sys.stderr)
    return 0

