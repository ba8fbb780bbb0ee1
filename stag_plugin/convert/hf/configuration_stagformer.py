"""StagFormerConfig: the inference folder's config.json as a `transformers` config.

This file is shipped verbatim in every inference folder (next to `modeling_stagformer.py` and a
copy of `stag_plugin/reference/model.py`), so `AutoConfig.from_pretrained(folder,
trust_remote_code=True)` works where stag_plugin is not installed. It must import nothing from
stag_plugin outside the fallback below.

The config holds every `ReferenceConfig` field at the top level under the same name (the
reference dataclass is the one list of fields), plus the folder's metadata (stag_format_version,
eos_token_id, tokenizer_file, source, ...), which transformers keeps as plain attributes, and
`use_cache` (default True: `generate()` decodes with the KV cache).
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

try:  # inside an inference folder: the copy of the reference model next to this file
    from .reference import ReferenceConfig
except ImportError:  # inside the stag_plugin package
    from stag_plugin.reference.model import ReferenceConfig

REFERENCE_FIELDS = {f.name: f for f in dataclasses.fields(ReferenceConfig)}


class StagFormerConfig(PretrainedConfig):
    """Every ReferenceConfig field as an attribute (required ones default to None so that
    transformers can build an empty config), with the usual transformers names as aliases."""

    model_type = "stagformer"
    attribute_map = {
        "num_hidden_layers": "num_layers",  # total depth, all sections
        "max_position_embeddings": "max_sequence_length",
        "num_key_value_heads": "num_query_groups",
        "intermediate_size": "ffn_hidden_size",
        "tie_word_embeddings": "tie_embeddings",
    }

    def __init__(self, **kwargs):
        for name, field in REFERENCE_FIELDS.items():
            default = None if field.default is dataclasses.MISSING else field.default
            setattr(self, name, kwargs.pop(name, default))
        # generate() decodes with the KV cache unless config.json says "use_cache": false
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)

    def to_reference_config(self) -> ReferenceConfig:
        """The ReferenceConfig that builds the model; names the fields that are unset."""
        unset = [name for name, field in REFERENCE_FIELDS.items()
                 if field.default is dataclasses.MISSING and getattr(self, name) is None]
        if unset:
            raise ValueError(f"StagFormerConfig lacks {unset}. Fix: load the config.json of an "
                             "inference folder (`stag convert to-inference`)")
        return ReferenceConfig(**{name: getattr(self, name) for name in REFERENCE_FIELDS})
