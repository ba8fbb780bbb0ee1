"""The self-contained inference folder: what `stag convert to-inference` writes and what the
plain-PyTorch reference model (and Hugging Face `transformers`) loads. No Megatron import.

    <folder>/config.json         the reference model's config (ReferenceConfig fields at the
                                 top level, Hugging Face style) plus the folder's metadata
    <folder>/model.safetensors   the reference StagFormer state dict (stag_plugin.reference.model
                                 names; shared weights stored once), one dtype throughout
    <folder>/tokenizer/          the tokenizer the token ids refer to, as checkpoints keep it
                                 (stag_tokenizer.json and its files; data.tokenizers)
    <folder>/tokenizer.json, tokenizer_config.json, ...
                                 the same tokenizer for `transformers.AutoTokenizer` (none for
                                 a NullTokenizer; stag_plugin.convert.hf_tokenizer)
    <folder>/README.md           what the folder holds and where it came from
    <folder>/configuration_stagformer.py, modeling_stagformer.py, reference.py
                                 the model code for `transformers` (trust_remote_code): copies
                                 of stag_plugin/convert/hf/*.py and stag_plugin/reference/model.py

config.json metadata next to the ReferenceConfig fields:
    "model_type": "stagformer", "stag_format_version": 1, "torch_dtype": "float32" (or
    "bfloat16" / "float16"), "eos_token_id": the end-of-document id, "source": {...} (the
    checkpoint it was converted from), "tokenizer": the tokenizer's description (type, files,
    ids) and under "transformers" whether the AutoTokenizer files were written and are exact,
    "auto_map": the transformers classes in the folder's code, "use_cache": true
    (generate() in transformers decodes with the model's KV cache; docs/huggingface.md).
    Folders converted before tokenizer types hold `tokenizer.model` and "tokenizer_file" instead.

Writing is atomic: everything goes to a temporary sibling folder that is renamed at the end, so
an interrupted conversion never leaves a half-written folder, and an existing folder is only
replaced once the new one is complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from stag_plugin.convert.hf import AUTO_MAP, REMOTE_CODE_FILES
from stag_plugin.errors import StagError
from stag_plugin.reference.model import ReferenceConfig, StagFormer
from stag_plugin.training.checkpointing import replace_dir

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"  # the tokenizer of folders converted before tokenizer/
README_FILE = "README.md"
MODEL_TYPE = "stagformer"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class InferenceFolderError(StagError):
    """An inference folder that cannot be written or loaded; the message names the fix."""


@dataclass
class InferenceModel:
    """A loaded inference folder."""

    model: StagFormer
    config: ReferenceConfig
    metadata: dict  # config.json entries that are not ReferenceConfig fields
    folder: Path

    @property
    def eod(self) -> Optional[int]:
        return self.metadata.get("eos_token_id")


# ---------------------------------------------------------------------------- config json


def config_to_json(cfg: ReferenceConfig, dtype: torch.dtype, metadata: dict) -> dict:
    """ReferenceConfig fields at the top level, then the folder's metadata."""
    entries = {"model_type": MODEL_TYPE, "architectures": ["StagFormerForCausalLM"],
               "stag_format_version": FORMAT_VERSION, "torch_dtype": DTYPE_NAMES[dtype],
               "auto_map": dict(AUTO_MAP),
               "use_cache": True}  # transformers' generate() decodes with the KV cache
    entries.update(dataclasses.asdict(cfg))
    entries.update(metadata)
    return entries


def config_from_json(entries: dict, where: str = CONFIG_FILE) -> tuple[ReferenceConfig, dict]:
    """config.json entries -> (ReferenceConfig, the other entries), with clear errors."""
    if entries.get("model_type") != MODEL_TYPE:
        raise InferenceFolderError(
            f"{where}: model_type is {entries.get('model_type')!r}, not {MODEL_TYPE!r}", ""
            "pass a folder written by `stag convert to-inference`")
    version = entries.get("stag_format_version")
    if version != FORMAT_VERSION:
        raise InferenceFolderError(
            f"{where}: stag_format_version {version!r}; this stag_plugin reads version "
            f"{FORMAT_VERSION}", "convert the checkpoint again with this stag_plugin")
    fields = {f.name: f for f in dataclasses.fields(ReferenceConfig)}
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in entries]
    if missing:
        raise InferenceFolderError(f"{where} lacks {missing}", "convert the checkpoint again "
                                   "(`stag convert to-inference`)")
    cfg = ReferenceConfig(**{k: v for k, v in entries.items() if k in fields})
    _check_config(cfg, where)
    return cfg, {k: v for k, v in entries.items() if k not in fields}


def _check_config(cfg: ReferenceConfig, where: str) -> None:
    problems = []
    if cfg.num_sections < 1 or cfg.num_layers % cfg.num_sections:
        problems.append(f"num_layers={cfg.num_layers} is not a multiple of num_sections="
                        f"{cfg.num_sections}")
    if cfg.num_attention_heads % max(cfg.num_query_groups, 1):
        problems.append(f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                        f"num_query_groups={cfg.num_query_groups}")
    if cfg.weight_sharing not in ("separate", "shared"):
        problems.append(f"weight_sharing={cfg.weight_sharing!r}")
    if cfg.output_combination not in ("last", "learned"):
        problems.append(f"output_combination={cfg.output_combination!r}")
    if problems:
        raise InferenceFolderError(f"{where}: {'; '.join(problems)}", "convert the "
                                   "checkpoint again (`stag convert to-inference`)")


# ---------------------------------------------------------------------------- writing


def save_inference_folder(folder: Union[str, Path], cfg: ReferenceConfig,
                          state_dict: Dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                          tokenizer_files: Optional[Dict[str, bytes]] = None,
                          metadata: Optional[dict] = None, readme: str = "",
                          overwrite: bool = False) -> Path:
    """Write an inference folder atomically; `state_dict` uses reference names and is checked
    against the reference model (every key once, every shape) before anything is written.
    `tokenizer_files`: posix path inside the folder -> content (the tokenizer/ folder and the
    transformers tokenizer files)."""
    from safetensors.torch import save_file

    from stag_plugin.reference.name_map import check_against_reference

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise InferenceFolderError(f"{folder} already exists", "pass another output folder, "
                                   "or --overwrite to replace it")
    check_against_reference(state_dict, cfg)
    weights = {k: v.detach().to(dtype).contiguous() for k, v in state_dict.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted earlier write
    partial.mkdir()
    try:
        save_file(weights, str(partial / WEIGHTS_FILE), metadata={"format": "pt"})
        entries = config_to_json(cfg, dtype, dict(metadata or {}))
        (partial / CONFIG_FILE).write_text(json.dumps(entries, indent=1, sort_keys=False) + "\n")
        for name, data in (tokenizer_files or {}).items():
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            (partial / name).write_bytes(data)
        (partial / README_FILE).write_text(readme)
        for name, source in REMOTE_CODE_FILES.items():  # the model code for transformers
            shutil.copyfile(source, partial / name)
        replace_dir(partial, folder)  # an existing folder goes only now
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


# ---------------------------------------------------------------------------- loading


def read_config(folder: Union[str, Path]) -> tuple[ReferenceConfig, dict]:
    """(ReferenceConfig, metadata) of an inference folder, without loading weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InferenceFolderError(f"inference folder {folder} does not exist", "pass the "
                                   "--out folder of `stag convert to-inference`")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InferenceFolderError(f"{path} is missing", "pass a folder written by "
                                   "`stag convert to-inference`, or convert again")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InferenceFolderError(f"{path} is not valid JSON ({err})", "convert the "
                                   "checkpoint again") from err
    if not isinstance(entries, dict):
        raise InferenceFolderError(f"{path} does not hold a JSON object", "convert again")
    return config_from_json(entries, str(path))


def read_weights(folder: Union[str, Path], cfg: ReferenceConfig,
                 dtype_name: str) -> Dict[str, torch.Tensor]:
    """model.safetensors, checked: readable, every reference key once with its shape, and the
    dtype config.json declares."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from stag_plugin.reference.name_map import check_against_reference

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise InferenceFolderError(f"{path} is missing", "convert the checkpoint again")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InferenceFolderError(f"{path} cannot be read ({err}): the file is truncated or "
                                   "corrupted", "convert the checkpoint again") from err
    try:
        check_against_reference(state, cfg)
    except (KeyError, ValueError) as err:
        raise InferenceFolderError(f"{path} does not match config.json: {err}", "keep the "
                                   "folder's files together, or convert again") from err
    wrong = sorted(k for k, v in state.items() if DTYPE_NAMES.get(v.dtype) != dtype_name)
    if wrong:
        raise InferenceFolderError(f"{path}: {len(wrong)} tensors (e.g. {wrong[0]}) are not "
                                   f"{dtype_name} as config.json says", "convert again")
    return state


def load_inference_folder(folder: Union[str, Path], device: Union[str, torch.device] = "cpu",
                          dtype: Optional[torch.dtype] = None) -> InferenceModel:
    """Load an inference folder into the reference StagFormer (eval mode). `dtype`: cast the
    weights (default: keep the folder's dtype)."""
    folder = Path(folder)
    cfg, metadata = read_config(folder)
    # "dtype": the name transformers' save_pretrained writes
    dtype_name = metadata.get("torch_dtype", metadata.get("dtype", "float32"))
    state = read_weights(folder, cfg, dtype_name)
    with torch.device("meta"):
        model = StagFormer(cfg)
    model.load_state_dict(state, assign=True)
    model = model.to(device=device, dtype=dtype or next(iter(state.values())).dtype).eval()
    return InferenceModel(model=model, config=cfg, metadata=metadata, folder=folder)
