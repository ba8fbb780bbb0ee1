"""`stag generate` end to end, in-process, on tiny checkpoints trained once per module.

The reference for greedy decoding is independent of the KV-cache engine: the full model forward
re-run on the growing sequence, taking argmax(model(tokens)[:, -1]) each time.
"""

import re
import shutil
from pathlib import Path

import pytest
import torch

from stag_plugin import cli, generate
from stag_plugin.decode import text
from stag_plugin.reference.sampling import Sampler
from stag_plugin.training import checkpointing, integrity

from stag_testing import prepared_cache, small_corpus, tiny_train_flags

VOCAB = 512
PROMPT = "def main(args):\n    "
NEW_TOKENS = 8
ITERS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory, "generate")


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory, corpus) -> Path:
    return prepared_cache(tmp_path_factory, corpus, VOCAB)[0]


def _train(tmp_path_factory, corpus, data_cache, sharing: str) -> Path:
    save = tmp_path_factory.mktemp(f"ckpt_{sharing}") / "run"
    flags = [*tiny_train_flags(corpus, data_cache, VOCAB), "--micro-batch-size", "4",
             "--log-interval", "1", "--train-iters", str(ITERS), "--stag-weight-sharing",
             sharing, "--save", str(save)]
    assert cli.main(["train", *flags]) == 0
    return save


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus, data_cache) -> Path:
    """A 2-section x 2-layer, hidden-32 StagFormer with separate section weights."""
    return _train(tmp_path_factory, corpus, data_cache, "separate")


@pytest.fixture(scope="module")
def shared_checkpoint(tmp_path_factory, corpus, data_cache) -> Path:
    return _train(tmp_path_factory, corpus, data_cache, "shared")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return generate.load_model(checkpoint)


def full_forward_greedy(loaded, prompt: str, new_tokens: int, sampler=None) -> list:
    """Greedy ids by re-running the whole model on the growing sequence (no caches); with a
    `sampler`, its choice from the same full-forward logits instead of the argmax."""
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer.tokenize(prompt)
    out = []
    with torch.no_grad():
        for _ in range(new_tokens):
            tokens = torch.tensor([ids])
            positions = torch.arange(len(ids)).unsqueeze(0)
            logits = model(tokens, positions)[:, -1, :tokenizer.vocab_size]  # [1, vocab]
            token = int(logits[0].argmax() if sampler is None else sampler(logits)[0])
            if token == tokenizer.eod:
                break
            ids.append(token)
            out.append(token)
    return out


def test_greedy_matches_full_forward_and_streams(loaded, capsys):
    pieces = []
    result = generate.generate_text(loaded, PROMPT, max_new_tokens=NEW_TOKENS,
                                    stream=lambda piece: (pieces.append(piece),
                                                          print(piece, end="", flush=True)))
    expected = full_forward_greedy(loaded, PROMPT, NEW_TOKENS)
    assert expected, "reference produced nothing (EOD first): pick another prompt"
    assert result.token_ids == expected
    assert result.text == loaded.tokenizer.detokenize(expected)
    assert capsys.readouterr().out == result.text == "".join(pieces)
    assert result.prefill_ms > 0 and result.cache_bytes["self"] > 0
    assert result.cache_bytes["cross"] > 0  # 2 sections: section 2 cross-attends


def test_seeded_sampling_matches_full_forward(loaded):
    """The tiny model's greedy choice is mostly one frequent token; sampling at temperature 1
    with one seed on both sides compares varied sequences, which only agree if the cached
    decode's distributions match the full forward's at every step."""
    result = generate.generate_text(loaded, PROMPT, max_new_tokens=12, temperature=1.0, seed=7)
    expected = full_forward_greedy(loaded, PROMPT, 12, sampler=Sampler(temperature=1.0, seed=7))
    assert result.token_ids == expected
    assert len(set(expected)) > 3


def test_streaming_holds_back_partial_characters(loaded):
    """A multi-byte character split over byte tokens is emitted once, whole."""
    tokenizer = loaded.tokenizer
    ids = tokenizer.tokenize("ab\u00e9\u4e2d")  # rare characters fall back to byte pieces
    pieces = []
    streamer = text._Streamer(tokenizer, pieces.append)
    for n in range(1, len(ids) + 1):
        streamer.update(ids[:n])
    assert streamer.finish(ids) == "ab\u00e9\u4e2d" == "".join(pieces)
    assert all("\ufffd" not in piece for piece in pieces)


def test_cli_generate(checkpoint, capsys):
    code = cli.main(["generate", "--load", str(checkpoint), "--prompt", PROMPT,
                     "--max-new-tokens", "5", "--stop", "7", "\n\n\n"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"\d+ tokens \| prefill [\d.]+ ms .* decode [\d.]+ tokens/s \| cache "
                     r"bytes self \d+ / cross \d+", captured.err), captured.err
    assert captured.out.endswith("\n")


def test_parser_accepts_every_flag():
    parser = generate.build_parser()
    options = parser.parse_args(["--load", "x", "--prompt", "p", "--mode", "recurrent",
                                 "--stop", "a", "3", "--compile", "--cuda-graph", "--dtype",
                                 "bf16"])
    assert options.mode == "recurrent" and options.stop == ["a", "3"]
    assert options.compile and options.cuda_graph and options.dtype == "bf16"
    defaults = parser.parse_args(["--load", "x", "--prompt", "p"])
    assert not defaults.compile and not defaults.cuda_graph and defaults.dtype is None


def test_stop_token_ends_generation(loaded):
    greedy = generate.generate_text(loaded, PROMPT, max_new_tokens=NEW_TOKENS)
    assert len(greedy.token_ids) >= 3
    stop_id = greedy.token_ids[2]
    stopped = generate.generate_text(loaded, PROMPT, max_new_tokens=NEW_TOKENS,
                                     stop=[str(stop_id)])
    first = greedy.token_ids.index(stop_id)
    assert stopped.token_ids == greedy.token_ids[:first + 1] and stopped.stopped == "stop"


def test_seeded_sampling_is_reproducible(loaded):
    def sample(seed):
        return generate.generate_text(loaded, PROMPT, max_new_tokens=12, temperature=1.0,
                                      top_k=50, seed=seed).token_ids
    assert sample(1) == sample(1)
    assert len({tuple(sample(s)) for s in range(2, 6)}) > 1


def test_batched_mode_on_shared_weights_matches_sequential(shared_checkpoint):
    model = generate.load_model(shared_checkpoint)
    sequential = generate.generate_text(model, PROMPT, max_new_tokens=NEW_TOKENS)
    batched = generate.generate_text(model, PROMPT, mode="batched", max_new_tokens=NEW_TOKENS)
    assert batched.token_ids == sequential.token_ids
    recurrent = generate.generate_text(model, PROMPT, mode="recurrent", max_new_tokens=4)
    assert recurrent.token_ids or recurrent.stopped == "eod"


def assert_usage_error(capsys, argv, *fragments):
    capsys.readouterr()
    code = cli.main(["generate", *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("stag generate: error: ") and "Fix:" in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_checkpoint_folder(tmp_path, capsys):
    assert_usage_error(capsys, ["--load", tmp_path / "nope", "--prompt", "x"], "does not exist")


def test_batched_mode_on_separate_weights_matches_sequential(loaded):
    sequential = generate.generate_text(loaded, PROMPT, max_new_tokens=NEW_TOKENS)
    batched = generate.generate_text(loaded, PROMPT, mode="batched", max_new_tokens=NEW_TOKENS)
    assert batched.token_ids == sequential.token_ids


def test_compiled_step_generates_the_same_text(loaded):
    """--compile (torch.compile of the Megatron engine's fixed-shape step), greedy and sampled."""
    for options in (dict(), dict(temperature=1.0, seed=5)):
        eager = generate.generate_text(loaded, PROMPT, max_new_tokens=NEW_TOKENS, **options)
        compiled = generate.generate_text(loaded, PROMPT, mode="batched", compile=True,
                                          max_new_tokens=NEW_TOKENS, **options)
        assert compiled.text == eager.text and compiled.token_ids == eager.token_ids, options


def test_bf16_decoding_of_a_checkpoint(checkpoint):
    model = generate.load_model(checkpoint)  # its own copy: the engine casts it in place
    fp32 = generate.generate_text(model, PROMPT, max_new_tokens=4)
    bf16 = generate.generate_text(model, PROMPT, max_new_tokens=4, dtype="bf16")
    assert bf16.cache_bytes["self"] * 2 == fp32.cache_bytes["self"]
    assert bf16.token_ids or bf16.stopped == "eod"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a CPU-only machine")
def test_impossible_decoding_options(checkpoint, capsys):
    assert_usage_error(capsys, ["--load", checkpoint, "--prompt", PROMPT, "--cuda-graph"],
                       "--cuda-graph", "no GPU", "drop --cuda-graph")
    # the Megatron engine compiles the step of modes batched / recurrent only
    assert_usage_error(capsys, ["--load", checkpoint, "--prompt", PROMPT, "--compile"],
                       "compile", "mode='batched'")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--load", str(checkpoint), "--prompt", PROMPT, "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_prompt_longer_than_the_model(checkpoint, capsys):
    assert_usage_error(capsys, ["--load", checkpoint, "--prompt", "x = 1\n" * 200],
                       "positions", "shorten --prompt")


# ------------------------------------------------------------------ inference folders


def _to_inference(checkpoint: Path, out: Path, dtype: str = "fp32") -> Path:
    assert cli.main(["convert", "to-inference", "--load", str(checkpoint), "--out", str(out),
                     "--dtype", dtype, "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("sharing", ["separate", "shared"])
def test_inference_folder_generates_what_the_checkpoint_generates(
        sharing, checkpoint, shared_checkpoint, tmp_path):
    """`stag generate` on a converted folder (reference model + ReferenceDecoder, no Megatron
    model) gives the tokens the training checkpoint gives (StagDecoder), greedy and sampled."""
    source = checkpoint if sharing == "separate" else shared_checkpoint
    from_checkpoint = generate.load_model(source)
    from_folder = generate.load_model(_to_inference(source, tmp_path / "folder"))
    assert type(from_folder.model).__name__ == "StagFormer"  # the reference model
    modes = ["sequential", "batched"] + (["recurrent"] if sharing == "shared" else [])
    for mode in modes:
        for options in (dict(), dict(temperature=1.0, seed=3)):
            want = generate.generate_text(from_checkpoint, PROMPT, mode=mode,
                                          max_new_tokens=10, **options)
            got = generate.generate_text(from_folder, PROMPT, mode=mode, max_new_tokens=10,
                                         **options)
            assert got.token_ids == want.token_ids, (mode, options)
            assert got.text == want.text and got.cache_bytes == want.cache_bytes


def test_cli_generate_from_an_inference_folder(checkpoint, tmp_path, capsys):
    folder = _to_inference(checkpoint, tmp_path / "folder", dtype="bf16")
    capsys.readouterr()
    code = cli.main(["generate", "--load", str(folder), "--prompt", PROMPT,
                     "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"\d+ tokens \| prefill [\d.]+ ms", captured.err), captured.err
    with pytest.raises(SystemExit):  # one section per pipeline rank needs torchrun, not this
        cli.main(["generate", "--load", str(folder), "--prompt", PROMPT, "--mode", "pipeline"])
    assert "invalid choice: 'pipeline'" in capsys.readouterr().err
    # Without its tokenizer the folder cannot tokenize a prompt: a clear error. A folder
    # converted before tokenizer/ existed holds the SentencePiece model as tokenizer.model.
    model = (folder / "tokenizer" / "tokenizer.model").read_bytes()
    shutil.rmtree(folder / "tokenizer")
    assert_usage_error(capsys, ["--load", folder, "--prompt", PROMPT], "holds no tokenizer",
                       "tokenizer/", "stag convert to-inference")
    (folder / "tokenizer.model").write_bytes(model)
    assert cli.main(["generate", "--load", str(folder), "--prompt", PROMPT,
                     "--max-new-tokens", "3"]) == 0


def test_inference_folder_compiled_and_bf16(checkpoint, tmp_path, capsys):
    """`stag generate --compile` prints the text the eager step prints (ReferenceDecoder, any
    mode); --dtype bf16 decodes an fp32 folder with bf16 caches."""
    folder = _to_inference(checkpoint, tmp_path / "folder")

    def text(*flags):
        capsys.readouterr()
        code = cli.main(["generate", "--load", str(folder), "--prompt", PROMPT,
                         "--max-new-tokens", str(NEW_TOKENS), *flags])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out

    for sampling in ([], ["--temperature", "1", "--seed", "3"]):  # sampled: a varied text
        eager = text("--mode", "batched", *sampling)
        assert text("--mode", "batched", "--compile", *sampling) == eager
    assert len(set(eager)) > 3, eager
    loaded = generate.load_model(folder)
    fp32 = generate.generate_text(loaded, PROMPT, max_new_tokens=4)
    bf16 = generate.generate_text(loaded, PROMPT, max_new_tokens=4, dtype="bf16")
    assert bf16.cache_bytes["self"] * 2 == fp32.cache_bytes["self"]
    assert next(loaded.model.parameters()).dtype == torch.float32  # the folder's model as is


def test_checkpoint_without_its_tokenizer(checkpoint, tmp_path, capsys):
    """The tokenizer lives in iter_XXXXXXX/tokenizer/; without it (and without the
    tokenizer.model of checkpoints saved before tokenizer/) the prompt cannot be tokenized."""
    copy = Path(shutil.copytree(checkpoint, tmp_path / "run"))
    folder = checkpointing.iteration_dir(copy, checkpointing.latest_iteration(copy))
    model = (folder / "tokenizer" / "tokenizer.model").read_bytes()
    shutil.rmtree(folder / "tokenizer")
    integrity.write_manifest(folder)  # a checkpoint saved without it
    assert_usage_error(capsys, ["--load", copy, "--prompt", PROMPT], "holds no tokenizer",
                       "tokenizer/", "tokenizer.model")
    (folder / "tokenizer.model").write_bytes(model)
    integrity.write_manifest(folder)
    legacy = generate.load_model(copy)
    assert legacy.tokenizer.tokenize(PROMPT) == generate.load_model(checkpoint).tokenizer \
        .tokenize(PROMPT)
