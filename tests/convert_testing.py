"""Helpers of the `stag convert` tests: the tiny corpus, CLI error checks, file snapshots,
checkpoint surgery (a damaged index, a truncated file) and a Megatron-LM GPT checkpoint."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from stag_plugin import cli
from stag_plugin.convert.common import partial_path

from stag_testing import TINY_TRAIN_DEFAULTS, prepared_cache, small_corpus

VOCAB = 512  # SentencePiece pieces; a multiple of 128, so Megatron's padding keeps it
SEQ = 32


def prepare_flags(tmp_path_factory) -> list:
    """`stag train` flags of a tiny model on 40 standard-library files (data prepared once)."""
    corpus = small_corpus(tmp_path_factory, "convert")
    cache, _ = prepared_cache(tmp_path_factory, corpus, VOCAB)
    return [*TINY_TRAIN_DEFAULTS, "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", str(SEQ),
            "--micro-batch-size", "2", "--global-batch-size", "4", "--vocab-size", str(VOCAB),
            "--data-path", str(corpus), "--data-cache-dir", str(cache),
            "--valid-fraction", "0.2", "--test-fraction", "0.2", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "100",
            "--eval-iters", "1", "--no-progress", "--distributed-timeout-minutes", "2"]


def tokenizer_of(flags: list) -> Path:
    cache = Path(flags[flags.index("--data-cache-dir") + 1])
    return next(cache.glob("tokenizer-*/spm.model"))


def convert_interrupted(*argv) -> None:
    """A conversion interrupted (Ctrl-C) ends with exit code 130 and one line."""
    code = cli.main(["convert", *map(str, argv)])
    assert code == 130, f"stag convert {' '.join(map(str, argv))} exited with {code}"


def convert_ok(*argv) -> None:
    code = cli.main(["convert", *map(str, argv)])
    assert code == 0, f"stag convert {' '.join(map(str, argv))} exited with {code}"


def assert_convert_error(capsys, argv, *words, out: Path = None) -> str:
    """Exit code 2, one `stag convert: error: <problem>. Fix: <fix>` line naming `words`, and
    neither --out nor its .partial sibling left behind."""
    code = cli.main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stag convert: error: ")]
    assert code == 2, err
    assert len(lines) == 1 and ". Fix: " in lines[0], err
    assert all(word in lines[0] for word in words), (words, lines[0])
    if out is not None:
        assert not partial_path(out).exists()
        assert not out.exists()
    return lines[0]


def iteration_folder(root: Path) -> Path:
    return next(Path(root).glob("iter_*"))


def plain_tensors(root: Path) -> dict:
    """Every tensor of the latest checkpoint under `root`, whole, read by Megatron's own
    reader (independent of the converter's)."""
    from megatron.core import dist_checkpointing

    folder = root if root.name.startswith("iter_") else iteration_folder(root)
    loaded = dist_checkpointing.load_plain_tensors(str(folder))  # + the common entries
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------- surgery


def edit_index(folder: Path, edit) -> None:
    """Rewrite the checkpoint's tensor index (.metadata) after `edit(state_dict_metadata)`."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata()
    edit(metadata.state_dict_metadata)
    with open(folder / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    resign(folder)


def resign(folder: Path) -> None:
    """A manifest matching the edited files: the converter's own checks are under test (a
    checkpoint edited or written by another program), not the manifest's."""
    from stag_plugin.training import integrity

    if (folder / integrity.MANIFEST).exists():
        integrity.write_manifest(folder)


def truncate_within(folder: Path, key: str) -> Path:
    """Cut the shard file that holds (a piece of) tensor `key` in the middle of that piece."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(folder)).read_metadata().storage_data
    info = next(info for index, info in storage.items() if index.fqn == key)
    path = folder / info.relative_path
    path.write_bytes(path.read_bytes()[: info.offset + info.length // 2])
    return path


# ---------------------------------------------------------------------------- Megatron-LM GPT


def megatron_lm_args(config, tie: bool, **overrides) -> argparse.Namespace:
    """The args Megatron-LM's training loop would store for `config` (what from-gpt reads),
    under the names Megatron-LM core_v0.16.1 - 0.19.0 store them (`layernorm_epsilon`,
    `layernorm_zero_centered_gamma`, `add_qkv_bias` = `add_bias_linear`, ...;
    tests/test_megatron_lm_training.py converts checkpoints Megatron-LM itself saved)."""
    values = dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        group_query_attention=config.num_query_groups not in (None, config.num_attention_heads),
        num_query_groups=config.num_query_groups, kv_channels=config.kv_channels,
        seq_length=SEQ, max_position_embeddings=SEQ,
        position_embedding_type=config.position_embedding_type, rotary_base=config.rotary_base,
        rotary_percent=config.rotary_percent, normalization=config.normalization,
        layernorm_epsilon=config.layernorm_epsilon, layernorm_zero_centered_gamma=False,
        swiglu=config.gated_linear_unit, add_bias_linear=config.add_bias_linear,
        add_qkv_bias=config.add_bias_linear, qk_layernorm=False,
        untie_embeddings_and_output_weights=not tie, padded_vocab_size=VOCAB,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=False, fp16=False,
        params_dtype=torch.float32)
    values.update(overrides)
    return argparse.Namespace(**values)


def save_megatron_lm(gpt, root: Path, iteration: int, args: argparse.Namespace) -> Path:
    """A GPTModel saved as Megatron-LM saves it: iter_XXXXXXX/ (torch_dist, stacked layers,
    the args in the common state) and the tracker file."""
    from megatron.core import dist_checkpointing

    from stag_plugin.compat.cpu import apply_cpu_compat

    apply_cpu_compat()  # Megatron's saver calls torch.cuda without a GPU otherwise
    folder = Path(root) / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    state = {"model": gpt.sharded_state_dict(), "args": args, "iteration": iteration,
             "checkpoint_version": 3.0}
    dist_checkpointing.save(state, str(folder))
    (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return Path(root)


def random_batch(seed: int, batch: int = 2, seq: int = SEQ) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    return tokens, torch.arange(seq).unsqueeze(0).expand(batch, seq)
