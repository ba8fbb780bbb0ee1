"""Shared helpers for the test suite: tiny configs, weight perturbation, random inputs."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from stag_plugin import StagFormerConfig, StagGPTModel

VOCAB = 96  # divisible by 2 (tensor-parallel tests)
MAX_LEN = 64


def tiny_config(**overrides) -> StagFormerConfig:
    """2 layers per section, hidden 64, 4 heads: Megatron's unit-test scale."""
    sections = overrides.get("num_sections", 2)
    settings = dict(
        num_layers=2 * sections, hidden_size=64, num_attention_heads=4, num_sections=sections,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
    )
    settings.update(overrides)
    if settings.get("gated_linear_unit"):
        settings.setdefault("activation_func", F.silu)
    return StagFormerConfig(**settings)


def build_model(config: StagFormerConfig, perturb: float = 0.05, seed: int = 0,
                **kwargs) -> StagGPTModel:
    """A model in eval mode whose every parameter (null memory, biases, norms too) is random."""
    torch.manual_seed(seed)
    model = StagGPTModel(config, vocab_size=VOCAB, max_sequence_length=MAX_LEN, **kwargs)
    perturb_parameters(model, perturb, seed)
    return model.eval()


def perturb_parameters(model: torch.nn.Module, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


SEEDS: list = []  # the seeds the running test drew (tests/conftest.py lists them on failure)


def fresh_seed() -> int:
    """A new seed per call, so parity tests see fresh random inputs. A failing test's report
    lists the seeds it drew; STAG_TEST_SEED=<seed> replays one (every call returns it)."""
    replay = os.environ.get("STAG_TEST_SEED")
    seed = int(replay) if replay else random.SystemRandom().randrange(2**31)
    SEEDS.append(seed)
    return seed


def fp32_bound(fp32: torch.Tensor, fp64: torch.Tensor, floor: float = 1e-4) -> float:
    """How far two fp32 computations of the same logits may lie apart: `floor`, 8x how far one
    of them (`fp32`) lies from the same computation in fp64, or 2e-5 of the largest logit,
    whichever is larger. Heavily perturbed random weights make some models ill-conditioned
    (fp32 alone is then a few 1e-4 from fp64 at logits ~30; a raw-memory model with a perturbed
    learned sum of its sections reaches logits in the thousands, where two fp32 orders of
    summation differ by ~1e-5 of them); a real error (a wrong mask, shift or cache) moves logits
    by O(1) of their scale."""
    relative = 2e-5 * fp64.abs().max().item()
    return max(floor, relative, 8 * (fp32.double() - fp64).abs().max().item())


def random_tokens(batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    positions = torch.arange(seq_len).unsqueeze(0).expand(batch, seq_len)
    return tokens, positions


def parameter_count(module: torch.nn.Module) -> int:
    """Unique parameters (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters())


def variant_id(variant: dict) -> str:
    """Readable pytest id for a dict of config overrides."""
    return "-".join(f"{k}={val}" for k, val in variant.items())


def decode_logits(decoder, tokens, prompt):
    """Prefill tokens[:, :prompt], then one step per remaining token -> logits [b, n, vocab]
    for positions prompt-1 .. n-1 (any decoder with prefill / step)."""
    logits = [decoder.prefill(tokens[:, :prompt])]
    for t in range(prompt, tokens.shape[1]):
        logits.append(decoder.step(tokens[:, t]))
    return torch.stack(logits, dim=1)


def small_corpus(tmp_path_factory, purpose: str) -> Path:
    """40 top-level standard-library modules of 4-20 kB, copied into `<tmp>/<purpose>N/corpus`.

    The folder is always named "corpus": document ids (hence the train/valid/test split) include
    the folder name, so a numbered name would make the split depend on test order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if 4_000 < p.stat().st_size < 20_000)[:40]
    assert len(files) == 40
    root = tmp_path_factory.mktemp(purpose) / "corpus"
    root.mkdir()
    for path in files:
        shutil.copyfile(path, root / path.name)
    return root


def modes_for(variant: dict) -> tuple:
    """Decode modes every variant supports on one device and holds equal to its forward."""
    return ("sequential", "batched")


def snapshot(folder: Path) -> dict:
    """Every entry below `folder`: relative path -> (size, mtime_ns, sha256) or 'dir'."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        key = path.relative_to(folder).as_posix()
        if path.is_dir():
            out[key] = "dir"
        else:
            stat, digest = path.stat(), hashlib.sha256(path.read_bytes()).hexdigest()
            out[key] = (stat.st_size, stat.st_mtime_ns, digest)
    return out


# The small-model values the tests train with where Megatron-LM's defaults (stag train's) suit
# large models. Put first in a test's flags (later flags win).
TINY_TRAIN_DEFAULTS = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
    "--seq-length", "256", "--transformer-impl", "local", "--position-embedding-type", "rope",
    "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--lr", "1e-3", "--min-lr", "1e-4",
    "--lr-warmup-iters", "10", "--lr-decay-style", "cosine", "--weight-decay", "0.1",
    "--adam-beta2", "0.95", "--micro-batch-size", "4", "--train-iters", "100",
    "--log-interval", "10", "--eval-interval", "50", "--eval-iters", "10",
    "--distributed-timeout-minutes", "2.0"]


def tiny_train_flags(corpus: Path, data_cache: Path, vocab: int) -> list:
    """`stag train` flags of a 2 x 2-layer, hidden-32 StagFormer on `corpus` (20% valid, 20%
    test), one evaluation batch, no progress bar (after TINY_TRAIN_DEFAULTS); add --train-iters,
    --save and the rest."""
    return [*TINY_TRAIN_DEFAULTS, "--num-layers", "4", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--vocab-size", str(vocab),
            "--data-path", str(corpus),
            "--data-cache-dir", str(data_cache), "--valid-fraction", "0.2", "--test-fraction",
            "0.2", "--lr", "5e-3", "--lr-warmup-iters", "1", "--eval-iters", "1",
            "--no-progress"]


def fp64_decode(model: StagGPTModel, tokens: torch.Tensor, prompt: int,
                mode: str = "sequential") -> torch.Tensor:
    """The logits `decode_logits` gives for a (TP = PP = 1) StagGPTModel, computed in fp64 by
    the reference model holding its weights: the yardstick for fp32_bound."""
    from stag_plugin.reference.decode import ReferenceDecoder
    from stag_plugin.reference.model import ReferenceConfig, StagFormer
    from stag_plugin.reference.name_map import megatron_to_reference

    cfg = ReferenceConfig.from_megatron(model.config, model.vocab_size, model.max_sequence_length,
                                        model.share_embeddings_and_output_weights)
    reference = StagFormer(cfg)
    reference.load_state_dict(megatron_to_reference(model.state_dict(), cfg))
    decoder = ReferenceDecoder(reference.double().eval(), tokens.shape[0], tokens.shape[1],
                               mode=mode)
    return decode_logits(decoder, tokens, prompt)


def prepared_cache(tmp_path_factory, corpus: Path, vocab: int):
    """`corpus` prepared once (tokenizer, 20% valid, 20% test) in a fresh data cache folder;
    returns (folder, PreparedData)."""
    from stag_plugin.training.data import prepare_data

    out = tmp_path_factory.mktemp("data")
    return out, prepare_data([str(corpus)], out, vocab_size=vocab, valid_fraction=0.2,
                             test_fraction=0.2, progress=False)
