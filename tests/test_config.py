"""StagFormerConfig: defaults, derived sizes, and one clear ValueError per kind of bad input."""

import ast
import inspect

import pytest
import torch

from stag_plugin import StagFormerConfig
from stag_plugin.core import config as config_module
from stag_plugin.errors import StagError

from stag_testing import tiny_config

STAG_FIELDS = ["num_sections", "weight_sharing", "cross_attention_window", "output_combination",
               "cross_attention_rope", "position_embedding_type", "rotary_base", "rotary_percent"]


def test_defaults_and_layers_per_section():
    cfg = StagFormerConfig(num_layers=6, hidden_size=32, num_attention_heads=4)
    assert (cfg.num_sections, cfg.weight_sharing) == (2, "separate")
    assert cfg.cross_attention_window is None
    assert (cfg.output_combination, cfg.cross_attention_rope) == ("last", True)
    assert cfg.layers_per_section == 3
    assert cfg.use_cpu_initialization == (not torch.cuda.is_available())


def test_every_stag_field_has_a_docstring():
    source = inspect.getsource(StagFormerConfig)
    body = ast.parse(source).body[0].body
    documented = {
        stmt.target.id for stmt, nxt in zip(body, body[1:])
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
        and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
    }
    assert set(STAG_FIELDS) <= documented


BAD = [
    # (overrides, field named in the message, words of the explanation)
    (dict(num_layers=5, num_sections=2), "num_layers", "not divisible by num_sections"),
    (dict(num_layers=2, num_sections=3), "num_layers", ">= num_sections"),
    (dict(num_sections=0, num_layers=2), "num_sections", "integer >= 1"),
    (dict(weight_sharing="tied"), "weight_sharing", "unknown weight sharing"),
    (dict(output_combination="mean"), "output_combination", "unknown output combination"),
    (dict(cross_attention_window=0), "cross_attention_window", "integer >= 1"),
    (dict(cross_attention_window=-3), "cross_attention_window", "integer >= 1"),
    (dict(cross_attention_window=2.5), "cross_attention_window", "integer >= 1"),
    (dict(cross_attention_window=True), "cross_attention_window", "integer >= 1"),
    (dict(position_embedding_type="alibi"), "position_embedding_type", "unknown position"),
    (dict(position_embedding_type="learned_absolute"), "cross_attention_rope",
     "needs position_embedding_type='rope'"),
    (dict(rotary_percent=0.0), "rotary_percent", "must be in (0, 1]"),
    (dict(num_attention_heads=6, hidden_size=48, tensor_model_parallel_size=4),
     "num_attention_heads", "not divisible by tensor_model_parallel_size"),
    (dict(num_attention_heads=4, num_query_groups=3), "num_query_groups",
     "must divide num_attention_heads"),
    (dict(num_attention_heads=4, num_query_groups=1, tensor_model_parallel_size=2),
     "num_query_groups", "not divisible by tensor_model_parallel_size"),
    (dict(hidden_size=66, num_attention_heads=4), "hidden_size",
     "not divisible by num_attention_heads"),
    (dict(sequence_parallel=True), "sequence_parallel", "needs tensor parallelism"),
    (dict(virtual_pipeline_model_parallel_size=2, pipeline_model_parallel_size=2),
     "virtual_pipeline_model_parallel_size", "not supported"),
    (dict(num_layers=4, num_sections=2, pipeline_model_parallel_size=3),
     "pipeline_model_parallel_size", "does not divide num_layers=4"),
]


@pytest.mark.parametrize("overrides,field,words", BAD,
                         ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_validation_error_names_field_and_fix(overrides, field, words):
    with pytest.raises(ValueError) as err:
        tiny_config(**overrides)
    message = str(err.value)
    assert f"StagFormerConfig.{field}=" in message
    assert words in message
    assert "Fix:" in message


VALID = [dict(num_sections=1, num_layers=3), dict(weight_sharing="shared"),
         dict(cross_attention_window=1, output_combination="learned"),
         dict(position_embedding_type="learned_absolute", cross_attention_rope=False),
         dict(num_query_groups=2, tensor_model_parallel_size=2),
         dict(sequence_parallel=True, tensor_model_parallel_size=2),
         dict(num_layers=4, num_sections=2, pipeline_model_parallel_size=4)]


@pytest.mark.parametrize("overrides", VALID, ids=lambda o: ",".join(map(str, o.values())))
def test_valid_variants_build(overrides):
    config = tiny_config(**overrides)
    assert all(getattr(config, field) == value for field, value in overrides.items())
    assert config.layers_per_section * config.num_sections == config.num_layers
    if config.pipeline_model_parallel_size > 1:  # the tensors between stages
        assert config.pipeline_dtype == config.params_dtype


def test_error_helper_is_the_single_message_format():
    with pytest.raises(StagError, match=r"^StagFormerConfig\.x=1: p\. Fix: f$") as err:
        config_module._fail("x", 1, "p", "f")
    assert (err.value.problem, err.value.fix) == ("StagFormerConfig.x=1: p", "f")
