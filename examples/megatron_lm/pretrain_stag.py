"""Pretrain a StagFormer with Megatron-LM's training loop (`megatron.training.pretrain`).

Megatron-LM's pretrain_gpt.py with three things swapped: the model (StagGPTModel: built by
StagGPTModelBuilder from a StagGPTModelConfig on Megatron-LM 0.19, by a model provider on 0.16 -
0.18), the batch (every pipeline stage gets the whole micro-batch, since every stage that starts
a section re-embeds the token ids), and the stages that build datasets (tensor-parallel rank 0
of every stage). Dataset configuration and the loss come from Megatron-LM's own pretrain_gpt.py;
in-process restart and the embedding ranks are handled as pretrain_gpt.py handles them.

    PYTHONPATH=/path/to/Megatron-LM:/path/to/stag_plugin_repo \\
        torchrun --nproc-per-node 2 examples/megatron_lm/pretrain_stag.py <Megatron-LM flags> \\
        --stag-num-sections 2 --stag-weight-sharing separate

See README.md next to this file.
"""

from functools import partial

import pretrain_gpt  # Megatron-LM's script, from the checkout on PYTHONPATH
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
from megatron.training import get_args, get_timers, print_rank_0
from megatron.training.datasets.fim_dataset import GPTFIMDataset

from stag_plugin.integrations import megatron_lm


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """pretrain_gpt's datasets, built on tensor-parallel rank 0 of every pipeline stage."""
    args = get_args()
    megatron_lm.check_megatron_lm_args(args)  # e.g. --sft (packed sequences) is refused
    config = pretrain_gpt.core_gpt_dataset_config_from_args(args)
    dataset_type = (MockGPTDataset if args.mock_data
                    else GPTFIMDataset if args.fim_data else GPTDataset)
    print_rank_0("> building train, validation, and test datasets for StagFormer ...")
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples,
        partial(megatron_lm.is_dataset_built_on_rank, vp_stage=vp_stage), config,
    ).build()


# Every rank calls the provider; BlendedMegatronDatasetBuilder builds where is_built_on_rank.
train_valid_test_datasets_provider.is_distributed = True


def forward_step(data_iterator, model):
    """One micro-batch: per-token losses [b, s] on the last stage, the boundary tensor before."""
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, attention_mask, position_ids = megatron_lm.get_batch(data_iterator)
    timers("batch-generator").stop()
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(pretrain_gpt.loss_func, loss_mask, model=model)


def main():
    megatron_lm.run_pretrain(
        train_valid_test_datasets_provider,
        forward_step,
        extra_args_provider=megatron_lm.add_stag_args,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )


if __name__ == "__main__":
    main()
