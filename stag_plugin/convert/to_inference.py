"""`stag convert to-inference`: a training checkpoint of any TP / PP layout -> the
self-contained inference folder (config.json, model.safetensors, tokenizer.model, README.md;
see stag_plugin.convert.inference_folder) that the plain-PyTorch reference model loads.

    stag convert to-inference --load runs/tiny --out models/tiny
    stag convert to-inference --load runs/tiny/iter_0000200 --out models/tiny-bf16 --dtype bf16

One process, no model is built: the model tensors are read whole from the distributed
checkpoint, checked against what the run record (stag_run.json) describes (every key, shape and
dtype), mapped to reference names by stag_plugin.reference.name_map (every key used once)
and written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from stag_plugin.compat.pickles import checkpoint_reads
from stag_plugin.convert import source
from stag_plugin.convert.common import ConvertError, check_out, say
from stag_plugin.reference import name_map
from stag_plugin.training import arguments, runtime

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def build_parser(prog: str = "stag convert to-inference") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=Path, required=True,
                        help="run folder (the latest iteration) or an iter_XXXXXXX folder")
    parser.add_argument("--out", type=Path, required=True, help="inference folder to write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32",
                        help="dtype of the stored weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
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
    record = source.read_record(ckpt)
    args = runtime.saved_args(record)
    source.check_record(record, args, ckpt.folder)
    cfg = reference_config(args, record)
    check_out(options.out, options.overwrite, ckpt.sources())
    dtype = source.params_dtype(args)
    megatron = read_model(ckpt, cfg, dtype, progress=not options.no_progress)
    reference = name_map.megatron_to_reference(megatron, cfg)
    name_map.check_against_reference(reference, cfg, dtype)
    folder = save_inference_folder(
        options.out, cfg, reference, dtype=DTYPES[options.dtype],
        tokenizer_model=_tokenizer(ckpt), metadata=metadata(ckpt, record),
        readme=readme(ckpt, record, options.dtype), overwrite=options.overwrite)
    say(f"wrote {folder} ({len(reference)} tensors, {options.dtype}) from {ckpt.folder}")
    return folder


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


def _tokenizer(ckpt: source.Checkpoint) -> Path:
    if ckpt.tokenizer_model is None:
        raise ConvertError(f"{ckpt.folder} has no tokenizer.model, so the inference folder "
                           "could not decode its ids",
                           "convert a checkpoint saved by stag train (it stores its tokenizer)")
    return ckpt.tokenizer_model


def metadata(ckpt: source.Checkpoint, record: dict) -> dict:
    """config.json entries next to the model config: where the weights came from."""
    return {
        "eos_token_id": record["tokenizer"]["eod"],
        "source": {"checkpoint": str(ckpt.folder.resolve()), "iteration": ckpt.iteration,
                   "architecture": record["architecture"], "tokenizer": record["tokenizer"],
                   "converted_by": "stag convert to-inference"},
    }


def readme(ckpt: source.Checkpoint, record: dict, dtype: str) -> str:
    arch = record["architecture"]
    return (
        "# StagFormer inference folder\n\n"
        f"Converted by `stag convert to-inference` from `{ckpt.folder.resolve()}` "
        f"(iteration {ckpt.iteration}); weights stored as {dtype}.\n\n"
        f"- sections: {arch['stag_num_sections']} ({arch['stag_weight_sharing']} weights), "
        f"{arch['num_layers']} layers in all, hidden size {arch['hidden_size']}\n"
        f"- vocabulary: {arch['padded_vocab_size']} (tokenizer.model, end of document id "
        f"{record['tokenizer']['eod']})\n\n"
        "Load it with `stag_plugin.convert.inference_folder.load_inference_folder(folder)`.\n")
