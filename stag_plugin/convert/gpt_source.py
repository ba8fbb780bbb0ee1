"""The plain GPT that `stag convert from-gpt` upcycles, read as a p = 1 StagGPTModel.

Two kinds of source, told apart by the run record:

    stag train --stag-num-sections 1     stag_run.json + its tokenizer; keys as StagGPTModel's
    Megatron-LM GPTModel                 no stag_run.json; args in the common state; GPTModel keys;
                                         the tokenizer from --tokenizer-* or those args

Megatron-LM's GPTModel keys map onto the p = 1 StagGPTModel keys by the tables below.
Megatron's TransformerBlock saves its (homogeneous) layers STACKED: one key
`decoder.layers.<module>.<param>` holding all L layers along a leading dimension [L, ...]; a
checkpoint saved with per-layer keys (`decoder.layers.{i}.<module>.<param>`) is read as well.
The pre-attention and pre-MLP norms are saved under the names of the Transformer Engine spec,
which fuses them into the next linear layer (`linear_qkv.layer_norm_weight`,
`linear_fc1.layer_norm_weight`), by Megatron's local spec too (its
`sharded_state_dict_keys_map`); both map onto StagGPTModel's separate norms.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import torch

from stag_plugin.convert import megatron_lm_args, source
from stag_plugin.convert.common import ConvertError
from stag_plugin.reference.name_map import TE_FUSED_NORMS  # Transformer Engine -> local names
from stag_plugin.training import checkpointing, runtime
from stag_plugin.training.data import tokenizers

GPT_KEYS = {  # Megatron-LM GPTModel -> StagGPTModel with one section
    "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "output_layer.weight": "output_layer.weight",
    "decoder.final_layernorm.weight": "sections.0.final_layernorm.weight",
    "decoder.final_layernorm.bias": "sections.0.final_layernorm.bias",
}
GPT_LAYERS = ("decoder.layers.", "sections.0.layers.{i}.")  # + "<module>.<param>"
_PER_LAYER_RE = re.compile(r"^(\d+)\.(.+)$")

@dataclass
class GPTSource:
    """A plain GPT as the p = 1 StagGPTModel it is equivalent to."""

    kind: str  # "stag" (stag train, p = 1) or "megatron-lm"
    ckpt: source.Checkpoint
    args: argparse.Namespace  # stag train flags describing it (p = 1)
    reference_cfg: object  # its ReferenceConfig (p = 1)
    state: Dict[str, torch.Tensor]  # StagGPTModel owner keys, whole tensors
    tokenizer: object  # the tokenizer its ids refer to (data.tokenizers; saved with the output)

    @property
    def num_layers(self) -> int:
        return self.args.num_layers


def read_gpt(ckpt: source.Checkpoint, tokenizer_flags: dict, scratch: Path,
             progress: bool = True, trust_code: bool = False) -> GPTSource:
    """The GPT in `ckpt`, of either kind, checked (keys, shapes, dtypes) and read whole.
    `tokenizer_flags`: the --tokenizer-type / --tokenizer-model / --vocab-file / --merge-file /
    --vocab-size values (None when absent; Megatron-LM sources only); a Megatron-LM source's
    tokenizer is written to `scratch`, which must outlive the returned GPTSource."""
    if (ckpt.folder / checkpointing.RUN_FILE).is_file():
        given = [f"--{k.replace('_', '-')}" for k, v in tokenizer_flags.items() if v is not None]
        if given:
            raise ConvertError(f"{', '.join(given)} are for Megatron-LM sources; "
                               f"{ckpt.folder} carries its own tokenizer", f"drop {given[0]}")
        return read_stag_gpt(ckpt, progress)
    return read_megatron_lm_gpt(ckpt, tokenizer_flags, scratch, progress, trust_code)


# ---------------------------------------------------------------------------- stag train p = 1


def read_stag_gpt(ckpt: source.Checkpoint, progress: bool) -> GPTSource:
    from stag_plugin.convert import to_inference

    record = source.read_record(ckpt)
    args = runtime.saved_args(record)
    source.check_record(record, args, ckpt.folder)
    if args.stag_num_sections != 1:
        raise ConvertError(f"{ckpt.folder} is a StagFormer with {args.stag_num_sections} "
                           "sections, not a plain GPT (p = 1)",
                           "upcycle a checkpoint trained with --stag-num-sections 1, or a "
                           "Megatron-LM GPT checkpoint")
    cfg = to_inference.reference_config(args, record)
    state = to_inference.read_model(ckpt, cfg, source.params_dtype(args), progress)
    if tokenizers.saved_spec(ckpt.folder) is None:
        raise ConvertError(f"{ckpt.folder} has no tokenizer ({tokenizers.CHECKPOINT_DIR}/ or "
                           f"{checkpointing.TOKENIZER_FILE})",
                           "upcycle a checkpoint saved by stag train (it stores its tokenizer)")
    return GPTSource("stag", ckpt, args, cfg, state, tokenizers.load_saved(ckpt.folder))


# ---------------------------------------------------------------------------- Megatron-LM GPT


def read_megatron_lm_gpt(ckpt: source.Checkpoint, tokenizer_flags: dict, scratch: Path,
                         progress: bool, trust_code: bool = False) -> GPTSource:
    from stag_plugin.convert import to_inference
    from stag_plugin.reference import name_map

    args, record, tokenizer = read_megatron_lm_run(ckpt, tokenizer_flags, scratch, trust_code)
    if args.stag_num_sections != 1:
        raise ConvertError(f"{ckpt.folder} is a StagFormer with {args.stag_num_sections} "
                           "sections trained through Megatron-LM, not a plain GPT",
                           "convert it for inference with `stag convert to-inference`, or "
                           "upcycle a GPT checkpoint")
    cfg = to_inference.reference_config(args, record)
    index = source.model_tensors(source.tensor_index(ckpt.folder))
    entries = stag_entries(index, args.num_layers, ckpt.folder)
    source.check_tensors({k: (shape, dtype) for k, (_, _, shape, dtype) in entries.items()},
                         name_map.megatron_shapes(cfg), source.params_dtype(args), ckpt.folder,
                         "pass the Megatron-LM checkpoint as it was saved: the args in its "
                         "common state must describe these tensors")
    whole = source.read_tensors(ckpt.folder, index, sorted({g for g, *_ in entries.values()}),
                                progress)
    state = {key: whole[gpt_key] if layer is None else whole[gpt_key][layer].clone()
             for key, (gpt_key, layer, _, _) in entries.items()}  # [L, ...] -> layer's [...]
    return GPTSource("megatron-lm", ckpt, args, cfg, state, tokenizer)


def read_megatron_lm_run(ckpt: source.Checkpoint, tokenizer_flags: dict, scratch: Path,
                         trust_code: bool = False) -> Tuple[argparse.Namespace, dict, object]:
    """A checkpoint written by Megatron-LM (a GPTModel, or a StagGPTModel trained through
    stag_plugin.integrations.megatron_lm): (stag train flags describing its model, a run record
    as stag_run.json holds it, its tokenizer built into `scratch`), all from the args in its
    common state and the --tokenizer-* values."""
    margs = source.read_common(ckpt.folder, trusted=trust_code).get("args")
    if margs is None:
        raise ConvertError(f"{ckpt.folder} has neither a stag_run.json nor Megatron-LM's args "
                           "(the common state's 'args'), so the model's configuration is unknown",
                           "pass a checkpoint written by stag train or by Megatron-LM")
    tokenizer = _tokenizer(tokenizer_flags, margs, ckpt, scratch)
    args = args_from_megatron_lm(margs, tokenizer.vocab_size, ckpt.folder)
    record = runtime.run_record(args, ckpt.iteration, margs.padded_vocab_size,
                                tokenizers.spec_of(tokenizer).to_json())
    return args, record, tokenizer


def stag_entries(index: source.TensorIndex, num_layers: int, where: Path) -> Dict[str, Tuple]:
    """StagGPTModel key -> (GPTModel key, layer within a stacked tensor or None, shape, dtype).
    Keys the tables do not know are kept under their own name (reported as unexpected)."""
    prefix = GPT_LAYERS[0]
    entries: Dict[str, Tuple] = {}
    for key, (shape, dtype) in index.items():
        if key in GPT_KEYS:
            found = {GPT_KEYS[key]: (key, None, shape, dtype)}
        elif key.startswith(prefix):
            found = _layer_entries(key, key[len(prefix):], shape, dtype, num_layers, where)
        else:
            found = {key: (key, None, shape, dtype)}
        for stag_key in found:
            if stag_key in entries:
                raise ConvertError(f"{where}: {key} and {entries[stag_key][0]} both hold "
                                   f"{stag_key}", "pass a checkpoint of one layer spec")
        entries.update(found)
    return entries


def _layer_entries(key, rest, shape, dtype, num_layers, where) -> Dict[str, Tuple]:
    template = GPT_LAYERS[1]
    per_layer = _PER_LAYER_RE.match(rest)
    if per_layer:  # decoder.layers.{i}.<module>.<param>
        module = TE_FUSED_NORMS.get(per_layer.group(2), per_layer.group(2))
        return {template.format(i=per_layer.group(1)) + module: (key, None, shape, dtype)}
    if not shape or shape[0] != num_layers:  # stacked: [L, ...]
        raise ConvertError(f"{where}: {key} stacks {shape[0] if shape else 0} layers, but the "
                           f"checkpoint's args say num_layers={num_layers}",
                           "pass the checkpoint as it was saved, with its own common state")
    module = TE_FUSED_NORMS.get(rest, rest)
    return {template.format(i=i) + module: (key, i, tuple(shape[1:]), dtype)
            for i in range(num_layers)}


def args_from_megatron_lm(margs, vocab_size: int, where=None) -> argparse.Namespace:
    """stag train flags describing a Megatron-LM GPT (stag_plugin.convert.megatron_lm_args)."""
    return megatron_lm_args.args_from_megatron_lm(margs, vocab_size, where or "the checkpoint")


TOKENIZER_ARGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")


def add_tokenizer_args(parser, title: str) -> None:
    """The --tokenizer-* flags (and --vocab-size) of a converter reading Megatron-LM
    checkpoints, in a group named `title`."""
    group = parser.add_argument_group(title)
    tokenizers.add_tokenizer_args(group)
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer: its number of ids")


def tokenizer_flags(options) -> dict:
    """The TOKENIZER_ARGS values of parsed converter options (None when absent)."""
    return {name: getattr(options, name, None) for name in TOKENIZER_ARGS}


def _tokenizer(flags: dict, margs, ckpt: source.Checkpoint, scratch: Path):
    """The tokenizer whose ids the Megatron-LM GPT was trained on, built into `scratch`: the
    --tokenizer-* flags, each absent one taken from the checkpoint's Megatron-LM args (the
    same names) when they name the same type and the file they name exists here. With no type
    anywhere, --tokenizer-model is a SentencePiece model of this plugin's own layout."""
    values, from_args = _tokenizer_values(flags, margs, ckpt)
    where = (f" (--{', --'.join(n.replace('_', '-') for n in from_args)} from the checkpoint's "
             "Megatron-LM args)") if from_args else ""
    if values["tokenizer_type"] is None and values["tokenizer_model"] is None:
        raise ConvertError(f"{ckpt.folder} is a Megatron-LM checkpoint whose args name no "
                           "tokenizer", "pass --tokenizer-type TYPE and its files "
                           "(--tokenizer-model PATH, or --vocab-file and --merge-file, or "
                           "--vocab-size N for NullTokenizer)")
    if values["tokenizer_type"] is None:
        return _stag_tokenizer(Path(values["tokenizer_model"]))
    return tokenizers.materialize(tokenizers.source_from_flags(**values, where=where),
                                  scratch / tokenizers.CHECKPOINT_DIR)


def _tokenizer_values(flags: dict, margs, ckpt: source.Checkpoint) -> Tuple[dict, list]:
    """(the tokenizer values to use, the names of those taken from the checkpoint's args)."""
    kind = getattr(margs, "tokenizer_type", None)
    same_type = flags.get("tokenizer_type") in (None, kind)
    values, from_args = {}, []
    for name in TOKENIZER_ARGS:
        value = flags.get(name)
        wanted = same_type and (name != "vocab_size" or kind == tokenizers.NULL)
        stored = getattr(margs, name, None) if wanted else None
        if value is None and stored is not None:
            if name in ("tokenizer_model", "vocab_file", "merge_file") and not Path(
                    stored).exists():
                flag = f"--{name.replace('_', '-')}"
                raise ConvertError(f"the args of {ckpt.folder} name {flag} {stored} "
                                   f"({kind}), which does not exist here",
                                   f"pass {flag} PATH (a local copy of that file)")
            value = stored + null_eod_offset(margs) if name == "vocab_size" else stored
            from_args.append(name)
        values[name] = value
    return values, from_args


def null_eod_offset(margs) -> int:
    """Ids a stored NullTokenizer --vocab-size leaves out. Megatron-LM <= 0.17 gives
    `--vocab-size N` N + 1 ids (its end of document is id N); from 0.18 N ids, the last the
    end of document (the plugin's meaning). The args of <= 0.17 hold `tokenizer_hf_use_fast`,
    which 0.18 removed."""
    return 1 if hasattr(margs, "tokenizer_hf_use_fast") else 0


def _stag_tokenizer(path: Path):
    """--tokenizer-model without a type: the plugin's own SentencePiece layout."""
    from stag_plugin.training.data import StagTokenizer

    if not path.is_file():
        raise ConvertError(f"--tokenizer-model {path} is not a file",
                           "pass the SentencePiece model the GPT was trained with")
    try:
        return StagTokenizer(path)
    except ValueError as err:
        raise ConvertError(f"--tokenizer-model {path} is not this plugin's SentencePiece "
                           f"layout ({getattr(err, 'problem', err)})",
                           "add --tokenizer-type GPTSentencePieceTokenizer "
                           "(any SentencePiece model)") from err
