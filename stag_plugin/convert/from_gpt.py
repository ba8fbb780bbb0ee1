"""`stag convert from-gpt`: upcycle a plain GPT into a StagFormer training checkpoint.

    stag convert from-gpt --load runs/gpt --out runs/stag-dup --recipe duplicate \
        --stag-num-sections 2
    stag convert from-gpt --load megatron/gpt --tokenizer-type GPT2BPETokenizer \
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --out runs/stag-split \
        --recipe split --stag-num-sections 2 --stag-weight-sharing separate

Sources: a `stag train --stag-num-sections 1` checkpoint (its own tokenizer), or a Megatron-LM
GPTModel checkpoint (any TP / PP layout; see stag_plugin.convert.gpt_source) with Megatron-LM's
tokenizer flags (--tokenizer-type and --tokenizer-model / --vocab-file / --merge-file /
--vocab-size; absent ones are read from the checkpoint's args when the files they name exist).
Recipes (stag_plugin.convert.recipes): `duplicate` gives every section a full copy of the
GPT's layers with zeroed cross-attention outputs, so the StagFormer starts with exactly the
GPT's logits; `split` cuts the GPT's layers into p consecutive blocks (not function-preserving).

Output (written in one process, TP 1 x PP 1, with the trainer's own save path, atomically): a
trainer checkpoint at iteration 0 (Megatron layout, stag_run.json, tokenizer/) plus
`architecture.yaml`, a preset of the new model's flags, so fine-tuning is

    stag train --config OUT/architecture.yaml --load OUT --finetune --save FT ...

(with the GPT's tokenizer flags, pointing at the files in OUT/iter_0000000/tokenizer/: the
fine-tuning data must be tokenized by the same tokenizer), and `stag eval --load OUT` /
`stag generate --load OUT` read it as they read any run.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from stag_plugin.compat.pickles import checkpoint_reads
from stag_plugin.convert import gpt_source, recipes, source
from stag_plugin.convert.common import ConvertError, check_out, say, staged_output
from stag_plugin.training.data import tokenizers

PRESET_FILE = "architecture.yaml"
PRESET_EXTRA_FLAGS = ("seq_length", "vocab_size", "make_vocab_size_divisible_by", "bf16")


def build_parser(prog: str = "stag convert from-gpt") -> argparse.ArgumentParser:
    from stag_plugin.training import arguments

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=Path, required=True,
                        help="GPT checkpoint: run folder or iter_XXXXXXX folder")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write")
    parser.add_argument("--recipe", choices=recipes.RECIPES, required=True)
    gpt_source.add_tokenizer_args(parser, "tokenizer (Megatron-LM sources only; default: the "
                                          "checkpoint's Megatron-LM args)")
    arguments.add_trust_arg(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true")
    arguments.add_stag_args(parser)
    parser.set_defaults(stag_num_sections=None, stag_cross_attention_rope=None)
    return parser


def main(argv) -> int:
    options = build_parser().parse_args(argv)
    with checkpoint_reads(trusted=options.trust_checkpoint_code):
        run(options)
    return 0


def run(options: argparse.Namespace) -> Path:
    if options.stag_num_sections is None:
        raise ConvertError("--stag-num-sections is required", "pass the number of sections p")
    ckpt = source.locate(options.load)
    check_out(options.out, options.overwrite, ckpt.sources())
    flags = gpt_source.tokenizer_flags(options)
    with tempfile.TemporaryDirectory(prefix="stag-from-gpt-") as scratch:
        gpt = gpt_source.read_gpt(ckpt, flags, Path(scratch), not options.no_progress,
                                  trust_code=options.trust_checkpoint_code)
        layers = recipes.check_recipe(options.recipe, gpt.num_layers, options.stag_num_sections,
                                      options.stag_weight_sharing)
        args = target_args(gpt, options, layers)
        check_vocabulary(gpt, args)
        with staged_output(options.out) as partial:
            write_checkpoint(partial, gpt, args, options)
    say(f"wrote {options.out}: {options.recipe} of the {gpt.num_layers}-layer GPT into "
        f"{options.stag_num_sections} x {layers} layers ({options.stag_weight_sharing}); "
        f"fine-tune with: stag train --config {options.out / PRESET_FILE} --load {options.out} "
        "--finetune ...")
    return Path(options.out)


def target_args(gpt, options: argparse.Namespace, layers_per_section: int):
    """The GPT's flags with the StagFormer's options and depth, TP 1 x PP 1."""
    from stag_plugin.training import arguments

    args = copy.copy(gpt.args)
    args.num_layers = options.stag_num_sections * layers_per_section
    for flag, _, _ in arguments.STAG_FLAGS:  # every --stag-* option as given here
        dest = arguments._dest(flag)
        setattr(args, dest, getattr(options, dest))
    rope = options.stag_cross_attention_rope  # default: on exactly when the GPT uses RoPE
    args.stag_cross_attention_rope = (args.position_embedding_type == "rope" if rope is None
                                      else rope)
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    args.sequence_parallel = args.use_distributed_optimizer = False
    args.config, args.load, args.save = None, str(gpt.ckpt.folder), str(options.out)
    arguments.config_from_args(args)  # an impossible combination fails here, before writing
    return args


def check_vocabulary(gpt, args) -> None:
    """The trainer must pad the tokenizer's vocabulary to the GPT's embedding rows."""
    from stag_plugin.training import arguments

    padded = arguments.padded_vocab_size(gpt.tokenizer.vocab_size, args)
    if padded != gpt.reference_cfg.vocab_size:
        raise ConvertError(f"the tokenizer's {gpt.tokenizer.vocab_size} ids pad to {padded} "
                           f"rows, but the GPT's embedding has {gpt.reference_cfg.vocab_size}",
                           "pass the tokenizer the GPT was trained with")


def write_checkpoint(folder: Path, gpt, args, options: argparse.Namespace) -> None:
    """Build the StagFormer with the trainer's code, give it the upcycled weights, save it as
    iteration 0 with a fresh optimizer, and check the saved tensors."""
    from stag_plugin.training import checkpointing, runtime

    vocab = gpt.reference_cfg.vocab_size
    runtime.start(1, 1, args.distributed_timeout_minutes, seed=args.seed)
    model = runtime.build_model(args, vocab)
    inner = runtime.unwrap(model[0])
    weights, owners = upcycled_weights(inner, gpt, args, options.recipe)
    inner.load_state_dict(weights)
    optimizer, scheduler = runtime.build_optimizer(args, model)  # fp32 copies: the new weights
    record = runtime.run_record(args, 0, vocab, tokenizers.spec_of(gpt.tokenizer).to_json())
    checkpointing.save_checkpoint(folder, 0, runtime.checkpoint_state(model, optimizer, scheduler),
                                  record, tokenizer=gpt.tokenizer)
    source.verify_tensors(checkpointing.iteration_dir(folder, 0), owners)
    write_preset(folder / PRESET_FILE, args)


def upcycled_weights(inner, gpt, args, recipe: str):
    """(state dict for `inner`, the owner tensors its checkpoint must hold)."""
    from stag_plugin.convert import to_inference
    from stag_plugin.reference import name_map

    cfg = to_inference.reference_config(args, {"architecture": {
        "padded_vocab_size": gpt.reference_cfg.vocab_size}})
    current = inner.state_dict()
    init = name_map.megatron_to_reference(current, cfg)  # Megatron's fresh init, by name
    gpt_reference = name_map.megatron_to_reference(gpt.state, gpt.reference_cfg)
    target = recipes.upcycle(recipe, gpt_reference, init, cfg.layers_per_section)
    name_map.check_against_reference(target, cfg, source.params_dtype(args))
    weights = name_map.reference_to_megatron(target, cfg, list(current))
    extra = {k: v for k, v in current.items() if k.endswith("_extra_state")}
    return {**extra, **weights}, {k: weights[k] for k in name_map.megatron_shapes(cfg)}


def write_preset(path: Path, args) -> None:
    """The flags that fix the new model's shapes, as a `stag train --config` preset."""
    import yaml

    from stag_plugin.training import arguments

    flags = arguments.ARCHITECTURE_FLAGS + PRESET_EXTRA_FLAGS
    values = {flag: getattr(args, flag) for flag in flags}
    header = (f"# Flags of the StagFormer upcycled from {args.load} (stag convert from-gpt).\n"
              "# stag train --config this.yaml --load <this folder> --finetune --save DIR ...\n")
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
