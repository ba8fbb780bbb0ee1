"""Megatron-LM's `pretrain()` with a StagFormer, under each of its calling conventions.

    run_pretrain               parse the command line, build the model the release's way, train
    pretrain_config_container  Megatron-LM >= 0.18: parsed args -> PretrainConfigContainer

How the model is built, by `stag_plugin.compat.megatron.megatron_lm_pretrain_api`:

    positional    (0.16 - 0.17)  pretrain() parses the command line and calls `model_provider`
    config        (0.18)         args parsed here; the container has no model config, so
                                 pretrain() calls `model_provider`
    model_config  (0.19)         args parsed here; the container's model config is a
                                 StagGPTModelConfig, built by its StagGPTModelBuilder (the path
                                 Megatron-LM recommends from 0.19; model providers are
                                 deprecated there)

In every case pretrain() is wrapped for Megatron-LM's in-process restart when that is enabled
(`--inprocess-restart`), and gets `get_embedding_ranks` for a StagFormer, as pretrain_gpt.py does.
"""

from __future__ import annotations

from typing import Callable, Optional

from stag_plugin.compat import megatron as compat
from stag_plugin.integrations.megatron_lm.config import add_stag_args
from stag_plugin.integrations.megatron_lm.model import get_embedding_ranks, model_provider


def run_pretrain(train_valid_test_dataset_provider: Callable, forward_step_func: Callable, *,
                 model_provider: Callable = model_provider,
                 extra_args_provider: Optional[Callable] = None,
                 args_defaults: Optional[dict] = None, pretrain: Optional[Callable] = None,
                 **pretrain_kwargs):
    """Train a StagFormer with Megatron-LM's `pretrain()` (the installed one unless `pretrain`
    is given), whichever calling convention it has.

    extra_args_provider defaults to `add_stag_args`; `model_provider` is used up to 0.18 (0.19
    builds the model from its config). Further keyword arguments go to pretrain().
    """
    from megatron.core.enums import ModelType

    if pretrain is None:
        from megatron.training import inprocess_restart, pretrain

        api = compat.megatron_lm_pretrain_api(pretrain)  # before any wrapping hides it
        pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
        pretrain_kwargs.setdefault("store", store)
    else:
        api = compat.megatron_lm_pretrain_api(pretrain)
    extra_args_provider = extra_args_provider or add_stag_args
    pretrain_kwargs.setdefault("get_embedding_ranks", get_embedding_ranks)
    common = dict(train_valid_test_dataset_provider=train_valid_test_dataset_provider,
                  model_type=ModelType.encoder_or_decoder, forward_step_func=forward_step_func,
                  **pretrain_kwargs)
    if api == "positional":
        return pretrain(model_provider=model_provider, extra_args_provider=extra_args_provider,
                        args_defaults=args_defaults or {}, **common)
    container = pretrain_config_container(extra_args_provider, args_defaults or {},
                                          with_model_config=api == "model_config")
    if api == "config":
        return pretrain(container, model_provider=model_provider, **common)
    return pretrain(container, **common)


def pretrain_config_container(extra_args_provider: Callable, args_defaults: dict,
                              with_model_config: bool = True):
    """Megatron-LM >= 0.18: parse and validate the command line (this sets the global args)
    and build the PretrainConfigContainer; with a StagGPTModelConfig when `with_model_config`
    (0.19), else none (0.18: pretrain() then calls the model provider)."""
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider,
                                   args_defaults=args_defaults)
    if not with_model_config:
        return pretrain_cfg_container_from_args(args)
    from stag_plugin.integrations.megatron_lm.model_config import stag_model_config

    return pretrain_cfg_container_from_args(args, stag_model_config(args))

