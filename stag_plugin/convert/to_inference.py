"""`stag convert to-inference`: a training checkpoint of any TP / PP layout -> the
self-contained inference folder (config.json, model.safetensors, tokenizer/, the tokenizer for
transformers' AutoTokenizer, README.md; see stag_plugin.convert.inference_folder) that the
plain-PyTorch reference model loads.

    stag convert to-inference --load runs/tiny --out models/tiny
    stag convert to-inference --load runs/tiny/iter_0000200 --out models/tiny-bf16 --dtype bf16
    stag convert to-inference --load megatron-lm/stag --out models/stag   # pretrain_stag.py's

Sources: a `stag train` checkpoint (stag_run.json and its tokenizer), or a StagFormer trained
by Megatron-LM's loop (examples/megatron_lm/pretrain_stag.py, a patched pretrain_gpt.py): its
flags are read from the args in its common state (stag_plugin.convert.megatron_lm_args), its
tokenizer from those args or --tokenizer-type and its files.

One process, no model is built: the model tensors are read whole from the distributed
checkpoint, checked against what the run record describes (every key, shape and dtype), mapped
to reference names by stag_plugin.reference.name_map (every key used once) and written
atomically.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from stag_plugin.compat.pickles import checkpoint_reads
from stag_plugin.convert import gpt_source, source
from stag_plugin.convert.common import ConvertError, check_out, say
from stag_plugin.reference import name_map
from stag_plugin.training import arguments, checkpointing, runtime
from stag_plugin.training.data import tokenizers

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def build_parser(prog: str = "stag convert to-inference") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=Path, required=True,
                        help="run folder (the latest iteration) or an iter_XXXXXXX folder")
    parser.add_argument("--out", type=Path, required=True, help="inference folder to write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32",
                        help="dtype of the stored weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    gpt_source.add_tokenizer_args(parser, "tokenizer (checkpoints written by Megatron-LM only; "
                                          "default: the checkpoint's Megatron-LM args)")
    arguments.add_trust_arg(parser)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv) -> int:
    options = build_parser().parse_args(argv)
    with checkpoint_reads(trusted=options.trust_checkpoint_code):
        run(options)
    return 0


def run(options: argparse.Namespace) -> Path:
    from stag_plugin.convert.inference_folder import DTYPES, save_inference_folder

    ckpt = source.locate(options.load)
    with tempfile.TemporaryDirectory(prefix="stag-to-inference-") as scratch:
        args, record, tokenizer = read_run(ckpt, options, Path(scratch))
        cfg = reference_config(args, record)
        check_out(options.out, options.overwrite, ckpt.sources())
        dtype = source.params_dtype(args)
        megatron = read_model(ckpt, cfg, dtype, progress=not options.no_progress)
        reference = name_map.megatron_to_reference(megatron, cfg)
        name_map.check_against_reference(reference, cfg, dtype)
        files, described = tokenizer_files(tokenizer)
    folder = save_inference_folder(
        options.out, cfg, reference, dtype=DTYPES[options.dtype], tokenizer_files=files,
        metadata=metadata(ckpt, record, described), overwrite=options.overwrite,
        readme=readme(ckpt, record, options.dtype, described))
    say(f"wrote {folder} ({len(reference)} tensors, {options.dtype}) from {ckpt.folder}")
    if not described["transformers"].get("exact", False):
        say(f"note: {_transformers_note(described['transformers'])}")
    return folder


def read_run(ckpt: source.Checkpoint, options: argparse.Namespace, scratch: Path) -> tuple:
    """(flags, run record, tokenizer) of a checkpoint: its stag_run.json and saved tokenizer
    (stag train), or the args in its common state and the tokenizer they or the --tokenizer-*
    flags name (Megatron-LM, e.g. examples/megatron_lm/pretrain_stag.py)."""
    flags = gpt_source.tokenizer_flags(options)
    if not (ckpt.folder / checkpointing.RUN_FILE).is_file():
        return gpt_source.read_megatron_lm_run(ckpt, flags, scratch,
                                               options.trust_checkpoint_code)
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    if given:
        raise ConvertError(f"{', '.join(given)} are for checkpoints written by Megatron-LM; "
                           f"{ckpt.folder} carries its own tokenizer", f"drop {given[0]}")
    record = source.read_record(ckpt)
    args = runtime.saved_args(record)
    source.check_record(record, args, ckpt.folder)
    if tokenizers.saved_spec(ckpt.folder) is None:
        raise ConvertError(f"{ckpt.folder} holds no tokenizer ({tokenizers.CHECKPOINT_DIR}/ or "
                           f"{tokenizers.SP_MODEL}), so the inference folder could not decode "
                           "its ids", "convert a checkpoint saved by stag train (it stores its "
                           "tokenizer)")
    return args, record, tokenizers.load_saved(ckpt.folder)


def reference_config(args: argparse.Namespace, record: dict):
    """The reference model's config for this run (layout-independent)."""
    from stag_plugin.reference.model import ReferenceConfig

    config = arguments.config_from_args(args)
    try:
        return ReferenceConfig.from_megatron(
            config, record["architecture"]["padded_vocab_size"], args.max_position_embeddings,
            tie_embeddings=not args.untie_embeddings_and_output_weights)
    except ValueError as err:
        raise ConvertError(f"this checkpoint uses a feature the inference folder's reference "
                           f"model lacks ({err})",
                           "decode the checkpoint itself with `stag generate --load`, or train "
                           "without that feature") from err


def read_model(ckpt: source.Checkpoint, cfg, dtype: torch.dtype, progress: bool = True) -> dict:
    """The checkpoint's model tensors (owner keys, whole), checked against `cfg` first."""
    index = source.tensor_index(ckpt.folder)
    expected = name_map.megatron_shapes(cfg)
    source.check_tensors(source.model_tensors(index), expected, dtype, ckpt.folder,
                         "convert the checkpoint together with the stag_run.json saved with it "
                         "(its flags must describe these tensors)")
    return source.read_tensors(ckpt.folder, index, expected, progress)


def tokenizer_files(tokenizer) -> tuple:
    """(files for the folder: tokenizer/ as checkpoints keep it plus the transformers
    tokenizer files, config.json's "tokenizer": the spec and the note on those files)."""
    from stag_plugin.convert import hf_tokenizer

    with tempfile.TemporaryDirectory(prefix="stag-tokenizer-") as tmp:
        tokenizers.save_tokenizer(tokenizer, Path(tmp) / tokenizers.CHECKPOINT_DIR)
        files = {path.relative_to(tmp).as_posix(): path.read_bytes()
                 for path in sorted(Path(tmp).rglob("*")) if path.is_file()}
    top, note = hf_tokenizer.export(tokenizer)
    return {**files, **top}, {**tokenizers.spec_of(tokenizer).to_json(), "transformers": note}


def _transformers_note(note: dict) -> str:
    if not note["written"]:
        return f"no transformers tokenizer was written: {note['why']}"
    return (f"the transformers tokenizer differs from the plugin's on some texts, e.g. "
            f"{note['differs_on']!r}")


def metadata(ckpt: source.Checkpoint, record: dict, tokenizer: dict) -> dict:
    """config.json entries next to the model config: where the weights came from, and the
    tokenizer (its description, and whether transformers' AutoTokenizer files are there)."""
    return {
        "eos_token_id": tokenizer["eod"],
        "tokenizer": tokenizer,
        "source": {"checkpoint": str(ckpt.folder.resolve()), "iteration": ckpt.iteration,
                   "architecture": record["architecture"], "tokenizer": record["tokenizer"],
                   "converted_by": "stag convert to-inference"},
    }


def readme(ckpt: source.Checkpoint, record: dict, dtype: str, tokenizer: dict) -> str:
    arch = record["architecture"]
    hf = ("`transformers.AutoTokenizer.from_pretrained(folder)` loads it"
          if tokenizer["transformers"]["written"] else _transformers_note(
              tokenizer["transformers"]))
    return (
        "# StagFormer inference folder\n\n"
        f"Converted by `stag convert to-inference` from `{ckpt.folder.resolve()}` "
        f"(iteration {ckpt.iteration}); weights stored as {dtype}.\n\n"
        f"- sections: {arch['stag_num_sections']} ({arch['stag_weight_sharing']} weights), "
        f"{arch['num_layers']} layers in all, hidden size {arch['hidden_size']}\n"
        f"- vocabulary: {arch['padded_vocab_size']} rows; tokenizer {tokenizer['type']} "
        f"({tokenizer['vocab_size']} ids, end of document id {tokenizer['eod']}) in "
        f"tokenizer/; {hf}\n\n"
        "Load it with `stag_plugin.convert.inference_folder.load_inference_folder(folder)`.\n")
