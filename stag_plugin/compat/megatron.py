"""The one place where stag_plugin meets version- or device-specific corners of Megatron-Core.

Everything here exists because megatron-core (0.16.1 is the reference version; 0.17 - 0.19 are
supported) assumes something that is not true on every machine, or changed its API between
releases. Model code imports these names instead of reaching into Megatron for them, so a new
Megatron release or a CPU-only machine means editing this file only.

Contents:
    import_megatron_core   import guard with a clear message when Transformer Engine is broken
    require_optional       import guard for transformer_engine / apex / deepspeed features
    transformer_engine_layers, transformer_engine_available, require_transformer_engine
                           megatron-core's Transformer Engine layers, and whether usable here
    cuda_capability        the GPU's compute capability (None without CUDA)
    fp8_disabled, fp8_region_open
                           Transformer Engine's FP8 region: turned off inside, and whether open
    RotaryEmbedding        Megatron's RotaryEmbedding that stays on the CPU when there is no GPU
    apply_rope             Megatron's apply_rotary_pos_emb, behind one signature
    name_kwargs            the `name=` keyword Megatron (0.19+) gives modules built from specs
    read_common_state      a checkpoint's common (non-tensor) state, as bytes, in either layout
    install_saver_queue    Megatron's checkpoint-saver queue, in a process that dies with ours
    null_tokenizer, detokenize_text, HF_TOKENIZER_KWARGS
                           megatron-core's text tokenizers with the same ids in every release
    model_parallel_rng     the model-parallel RNG fork on CUDA, a no-op on CPU
    initialize_single_process   a world of one process (gloo) for notebooks, probes and tests
    megatron_lm_pretrain_api    which calling convention Megatron-LM's `pretrain()` has
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint

_TE_BROKEN_HELP = (
    "Megatron-Core could not be imported because Transformer Engine failed to load: {err}\n"
    "Transformer Engine is installed but its CUDA libraries (cuDNN/cuBLAS) are missing, which is "
    "the usual state on a machine without a GPU. megatron-core only tolerates an *absent* "
    "Transformer Engine, not a broken one. Fix: uninstall it on CPU-only machines "
    "(`pip uninstall -y transformer-engine transformer-engine-torch transformer-engine-cu12`), "
    "or install the CUDA libraries it needs on GPU machines."
)


def import_megatron_core():
    """Import megatron.core, turning Transformer Engine's load failure into an actionable error.

    With transformer-engine installed on a machine without CUDA libraries, `import megatron.core`
    raises RuntimeError/OSError from inside TE (megatron only catches ImportError).
    """
    try:
        return importlib.import_module("megatron.core")
    except ImportError as err:
        if err.name == "triton":  # megatron-core 0.19 imports triton at start-up
            raise ImportError(
                f"megatron-core could not be imported: {err}. From 0.19 it imports triton when "
                "it starts; CUDA builds of torch bring triton, CPU builds do not. Fix: "
                "`pip install triton`") from err
        if "megatron" in str(err):
            raise ImportError(
                "stag_plugin needs megatron-core >= 0.16.1: `pip install 'megatron-core>=0.16.1'`"
            ) from err
        raise
    except (RuntimeError, OSError) as err:
        raise ImportError(_TE_BROKEN_HELP.format(err=err)) from err


_OPTIONAL = {
    "transformer_engine": "pip install transformer-engine[pytorch] (needs CUDA and cuDNN)",
    "apex": "build NVIDIA apex from source (https://github.com/NVIDIA/apex), needs CUDA",
    "deepspeed": "pip install deepspeed",
}


def require_optional(module: str, feature: str):
    """Import an optional dependency or raise ImportError naming the feature that needs it."""
    if module not in _OPTIONAL:
        raise KeyError(f"unknown optional dependency {module!r}; known: {sorted(_OPTIONAL)}")
    try:
        return importlib.import_module(module)
    except Exception as err:  # TE raises RuntimeError/OSError when its CUDA libraries are missing
        raise ImportError(
            f"{feature} needs the optional dependency '{module}', which could not be imported "
            f"({type(err).__name__}: {err}). Install it with: {_OPTIONAL[module]}"
        ) from err


import_megatron_core()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.common.embeddings import rope_utils  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import (  # noqa: E402
    RotaryEmbedding as _MegatronRotaryEmbedding,
)
from megatron.core.transformer.attention import Attention as _Attention  # noqa: E402

# ---------------------------------------------------------------------------- Transformer Engine

# megatron-core imports Transformer Engine when it can (`HAVE_TE`); without it the `TE*` classes
# of megatron.core.extensions.transformer_engine still exist, as stand-ins whose constructors
# fail, so specs naming them can be built and inspected on any machine.
TE_INSTALL = ("pip install --no-build-isolation 'transformer_engine[pytorch]' on a machine "
              "with CUDA, cuDNN and a CUDA build of torch (NVIDIA's PyTorch containers ship it)")


def transformer_engine_layers():
    """megatron.core.extensions.transformer_engine: Megatron's TE layers (or their stand-ins)."""
    return importlib.import_module("megatron.core.extensions.transformer_engine")


def transformer_engine_available() -> bool:
    """Whether megatron-core loaded Transformer Engine (its TE layers can be built)."""
    return bool(transformer_engine_layers().HAVE_TE)


def require_transformer_engine(feature: str) -> None:
    """MissingDependency naming `feature` and the install, unless Transformer Engine loaded."""
    from stag_plugin.errors import MissingDependency

    if not transformer_engine_available():
        raise MissingDependency(
            f"{feature} needs NVIDIA Transformer Engine, which megatron-core could not import "
            "here", f"{TE_INSTALL}; or use the local layers (transformer_impl='local', "
            "--transformer-impl local), which run everywhere")


def cuda_capability():
    """(major, minor) compute capability of the current GPU; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def fp8_disabled():
    """A region in which Transformer Engine computes in high precision inside an FP8 region
    (TE 2.x `autocast(enabled=False)`; `fp8_autocast` before it was renamed)."""
    import transformer_engine.pytorch as te_pytorch

    autocast = getattr(te_pytorch, "autocast", None) or te_pytorch.fp8_autocast
    return autocast(enabled=False)


def fp8_region_open() -> bool:
    """Whether the caller runs inside an enabled Transformer Engine FP8 region."""
    if not transformer_engine_available():
        return False
    return bool(transformer_engine_layers().FP8GlobalStateManager.is_fp8_enabled())


# megatron-core 0.19 gives every module built from a spec its instance name (`name=`, e.g.
# "decoder.layers.3.cross_attention") and passes it on to the module's own submodules (linear
# layers included); 0.16 - 0.18 have no such argument.
_MODULES_TAKE_NAMES = "name" in inspect.signature(_Attention.__init__).parameters


def name_kwargs(name, child: str = "") -> dict:
    """`{"name": name + child}` for Megatron releases whose modules take instance names (0.19+),
    `{}` for older ones; `name` None (a module built without a parent's name) stays None."""
    if not _MODULES_TAKE_NAMES:
        return {}
    return {"name": None if name is None else name + child}


class RotaryEmbedding(_MegatronRotaryEmbedding):
    """Megatron's RotaryEmbedding, usable on machines without CUDA.

    megatron-core 0.16 `RotaryEmbedding.get_emb` moves `inv_freq` to
    `torch.cuda.current_device()` whenever it sits on the CPU. With CUDA present we keep that
    behaviour; without it the same frequencies are computed on the CPU.
    """

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        if torch.cuda.is_available():
            return super().get_emb(max_seq_len, offset)
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]  # [s, 1, 1, dim]


def rotary_embedding(config) -> RotaryEmbedding:
    """The RoPE module for a StagFormerConfig (self- and cross-attention use the same one)."""
    return RotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=config.rotary_percent,
        rotary_interleaved=config.rotary_interleaved,
        rotary_base=config.rotary_base,
        use_cpu_initialization=config.use_cpu_initialization or not torch.cuda.is_available(),
    )


def apply_rope(t: torch.Tensor, freqs: torch.Tensor, config) -> torch.Tensor:
    """Rotate `t` [s, b, heads, d] by `freqs` [s, 1, 1, d_rot] (Megatron's bshd path)."""
    return rope_utils.apply_rotary_pos_emb(t, freqs, config=config)


def model_parallel_rng():
    """Context for dropout that must differ across tensor-parallel ranks.

    On CUDA this is Megatron's model-parallel RNG tracker; the CPU build has no such tracker
    (it stores CUDA RNG states), so there the default generator is used.
    """
    if torch.cuda.is_available():
        return tensor_parallel.get_cuda_rng_tracker().fork()
    return contextlib.nullcontext()


def initialize_single_process(tensor_model_parallel_size: int = 1) -> None:
    """Set up torch.distributed (gloo, world size 1) and Megatron's parallel state.

    For notebooks, scripts and tests that run one process. Multi-process jobs initialise
    torch.distributed themselves (torchrun) and call `parallel_state.initialize_model_parallel`.
    """
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size
        )


def free_port() -> int:
    """A free TCP port on loopback (for MASTER_PORT)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------- checkpoints

# Up to megatron-core 0.18 `dist_checkpointing.save` writes a checkpoint's common (non-tensor)
# state, e.g. Megatron-LM's args, to `common.pt` beside the torch_dist shards; from 0.19 it is
# the byte object "common_state" inside the torch_dist checkpoint and common.pt is only read
# from older checkpoints. Which layout a folder has depends on who wrote it, not on the
# installed release, so both are read.
LEGACY_COMMON_FILE = "common.pt"
COMMON_STATE_KEY = "common_state"


@dataclass(frozen=True)
class CommonState:
    """A checkpoint's serialized common state, not yet unpickled."""

    where: str  # the file or checkpoint entry it came from (for messages)
    payload: bytes  # torch.save output
    sharded: bool  # 0.19 layout: a ShardedObject, whose payload holds [state]

    def load(self, unpickle):
        """The state, unpickled by `unpickle` (bytes -> object; the caller chooses how far to
        trust them)."""
        found = unpickle(self.payload)
        if not self.sharded:
            return found
        if not isinstance(found, list) or len(found) != 1:
            raise ValueError(f"{self.where} is not the one-element list megatron-core writes")
        return found[0]


def read_common_state(folder) -> CommonState:
    """The common state of checkpoint `folder` in either layout (FileNotFoundError: none)."""
    from pathlib import Path

    folder = Path(folder)
    legacy = folder / LEGACY_COMMON_FILE
    if legacy.is_file():
        return CommonState(str(legacy), legacy.read_bytes(), sharded=False)
    key = _common_state_storage_key()
    reader = torch.distributed.checkpoint.FileSystemReader(str(folder))
    if key not in reader.read_metadata().state_dict_metadata:
        raise FileNotFoundError(f"{folder} holds neither {LEGACY_COMMON_FILE} (megatron-core "
                                f"<= 0.18) nor a '{COMMON_STATE_KEY}' entry (0.19+)")
    planner = _RawBytesPlanner()
    torch.distributed.checkpoint.load({key: None}, storage_reader=reader, planner=planner,
                                      no_dist=True)
    return CommonState(f"{folder} ('{COMMON_STATE_KEY}' entry)", planner.raw[key], sharded=True)


def _common_state_storage_key() -> str:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(COMMON_STATE_KEY, None, (1,), (0,)).unique_key


class _RawBytesPlanner(torch.distributed.checkpoint.DefaultLoadPlanner):
    """Keeps byte entries as bytes: torch's planner unpickles them without restriction."""

    def __init__(self):
        super().__init__(flatten_state_dict=False)
        self.raw = {}

    def load_bytes(self, read_item, value) -> None:
        self.raw[read_item.dest_index.fqn] = value.read()


def install_saver_queue() -> None:
    """Give Megatron's checkpoint saver (dist_checkpointing.strategies.filesystem_async, a
    module global in 0.16 - 0.19) a results queue whose server process dies with this one
    (stag_plugin.compat.children), instead of the Manager it would start on first use."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from stag_plugin.compat.children import saver_results_queue

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = saver_results_queue()


# ---------------------------------------------------------------------------- tokenizers

# megatron-core's text tokenizers (`megatron.core.tokenizers`) differ between releases in three
# places the plugin meets:
# - NullTokenizer: 0.16 names its library "null" and reads `vocab_size` as the ids before the
#   end-of-document id (vocab_size + 1 ids, eod = vocab_size, no pad); 0.19 names it
#   "null-text" and reads it as Megatron-LM's --vocab-size (eod = vocab_size - 1, pad -1).
# - HuggingFace library defaults: 0.16 `use_fast=False, include_special_tokens=False`, 0.19
#   both True (Megatron-LM's defaults, --tokenizer-hf-no-use-fast / -no-include-special-tokens
#   turn them off). The plugin passes Megatron-LM's values explicitly, so ids do not depend on
#   the release.
# - `detokenize`: 0.19 takes `skip_special_tokens` (its HuggingFace library keeps special tokens
#   by default when it includes them in `tokenize`); 0.16 takes ids only and drops them.
HF_TOKENIZER_KWARGS = {"use_fast": True, "include_special_tokens": True}


def null_tokenizer(vocab_size: int):
    """megatron-core's NullTokenizer with Megatron-LM's ids in every release: `vocab_size` ids,
    the last one (vocab_size - 1) the end of document."""
    from megatron.core.tokenizers import MegatronTokenizer
    from megatron.core.tokenizers.text.text_tokenizer import TOKENIZER_MAPPING_LIBRARIES

    library = "null-text" if "null-text" in TOKENIZER_MAPPING_LIBRARIES else "null"
    tokenizer = MegatronTokenizer.from_pretrained(metadata_path={"library": library},
                                                  vocab_size=vocab_size)
    if tokenizer.vocab_size == vocab_size + 1:  # 0.16: the argument excludes the eod id
        tokenizer = MegatronTokenizer.from_pretrained(metadata_path={"library": library},
                                                      vocab_size=vocab_size - 1)
    return tokenizer


def detokenize_text(tokenizer, ids: list) -> str:
    """Text of `ids` from a megatron-core text tokenizer, special tokens left out in every
    release."""
    if "skip_special_tokens" in inspect.signature(tokenizer.detokenize).parameters:
        return tokenizer.detokenize(ids, skip_special_tokens=True)
    return tokenizer.detokenize(ids)


# ---------------------------------------------------------------------------- Megatron-LM

PRETRAIN_APIS = ("positional", "config", "model_config")


def megatron_lm_pretrain_api(pretrain) -> str:
    """Which calling convention Megatron-LM's `megatron.training.pretrain` has.

    "positional" (Megatron-LM 0.16 - 0.17): `pretrain(train_valid_test_dataset_provider,
        model_provider, model_type, forward_step_func, ..., extra_args_provider, args_defaults)`;
        pretrain parses the command line itself.
    "config" (0.18): `pretrain(cfg_container, train_valid_test_dataset_provider,
        model_provider, model_type, forward_step_func, ...)`; the caller parses the command
        line (`parse_and_validate_args`) and builds the container
        (`pretrain_cfg_container_from_args`).
    "model_config" (0.19): `pretrain(cfg_container, train_valid_test_dataset_provider,
        model_type, forward_step_func, model_provider=None, ...)`; the model comes from the
        container's model config (a `ModelConfig` and the builder it names) and
        `model_provider` is deprecated.

    Told from the signature, not a version number: a Megatron-LM checkout on PYTHONPATH need
    not match the installed megatron-core's version.
    """
    params = inspect.signature(pretrain).parameters
    if "cfg_container" in params:
        provider = params.get("model_provider")
        optional = provider is not None and provider.default is None
        return "model_config" if optional else "config"
    if "extra_args_provider" in params and "train_valid_test_dataset_provider" in params:
        return "positional"
    raise TypeError(
        f"unrecognised Megatron-LM pretrain{inspect.signature(pretrain)}: expected "
        "pretrain(train_valid_test_dataset_provider, ..., extra_args_provider=...) (Megatron-LM "
        "<= 0.17) or pretrain(cfg_container, ...) (>= 0.18). Fix: use a Megatron-LM release "
        "between core_v0.16.1 and core_v0.19, or extend stag_plugin.compat.megatron")
