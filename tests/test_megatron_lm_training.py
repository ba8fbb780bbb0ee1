"""Megatron-LM's own training loop, checkpoints and scripts, run with the plugin's model.

Needs a Megatron-LM checkout (`MEGATRON_LM_PATH`; the entry imports the checkout's
pretrain_gpt.py) of the release line of the installed megatron-core: core_v0.16.1 with
megatron-core 0.16 (`.venv`), core_v0.19.0 with 0.19 (`.venv-mcore`); `make test-megatron-lm`
runs both. Skipped otherwise (CI has no checkout). Every run is a real Megatron-LM script
(`pretrain()`: argument parsing, model building, Megatron's optimizer, `train_step`, the
replica-gradient sync inside its loop, evaluation, `save_checkpoint`, `load_checkpoint`) on CPU
processes with the test-only stubs of tests/megatron_lm_cpu.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from stag_plugin import cli, generate

from megatron_lm_cpu import REPO, grad_norms, launch, losses, validation_loss

CHECKOUT = os.environ.get("MEGATRON_LM_PATH")
ENTRY = REPO / "examples" / "megatron_lm" / "pretrain_stag.py"
VOCAB, SEQ = 128, 32
MODEL = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
         "--max-position-embeddings 32 --position-embedding-type rope --no-rope-fusion "
         "--transformer-impl local --no-gradient-accumulation-fusion --no-persist-layer-norm "
         "--no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion "
         "--hidden-dropout 0 --attention-dropout 0").split()
TRAINING = ("--micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --min-lr 1e-4 "
            "--lr-decay-style cosine --lr-warmup-iters 1 --clip-grad 1.0 --seed 1234 "
            "--tokenizer-type NullTokenizer --vocab-size 128 --mock-data --split 98,1,1 "
            "--distributed-backend gloo --log-interval 1 --eval-interval 1000 --eval-iters 1 "
            "--ckpt-format torch_dist").split()
STAG = "--stag-num-sections 2 --stag-weight-sharing shared --stag-cross-attention-window 8"


def release_line(version: str) -> str:
    return ".".join(version.split(".")[:2])


def checkout_version(checkout: Path) -> str:
    """The megatron-core version a checkout holds (read, not executed)."""
    text = (checkout / "megatron" / "core" / "package_info.py").read_text()
    parts = [re.search(rf"^{name} = (\d+)", text, re.M).group(1)
             for name in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


NEEDS_CHECKOUT = ("set MEGATRON_LM_PATH to a Megatron-LM checkout (core_v0.16.1 with "
                  "megatron-core 0.16, core_v0.19.0 with 0.19; `make test-megatron-lm`)")


@pytest.fixture(scope="module")
def checkout() -> Path:
    if not CHECKOUT:
        pytest.skip(NEEDS_CHECKOUT)
    return checked_out()


def checked_out() -> Path:
    import megatron.core

    path = Path(CHECKOUT).resolve()
    if not (path / "megatron" / "training").is_dir():
        pytest.fail(f"MEGATRON_LM_PATH={CHECKOUT} is not a Megatron-LM checkout")
    line, installed = release_line(checkout_version(path)), release_line(megatron.core.__version__)
    if line != installed:
        pytest.skip(f"MEGATRON_LM_PATH is Megatron-LM {line}, megatron-core {installed} is "
                    "installed: run it with the matching environment (make test-megatron-lm)")
    return path


def flags(save, iters: int, *extra) -> list:
    """The tiny model's flags; saved at the end (and every --save-interval) when `save`."""
    saving = ["--save", save, "--save-interval", iters] if save else []
    return [*MODEL, *TRAINING, "--train-iters", iters, *saving, *extra]


def close(found: dict, expected: dict, iterations, rel: float) -> None:
    for it in iterations:
        assert found[it] == pytest.approx(expected[it], rel=rel), (it, found, expected)


# ------------------------------------------------------------------ the StagFormer entry


@pytest.fixture(scope="module")
def stag_run(checkout, tmp_path_factory) -> dict:
    """examples/megatron_lm/pretrain_stag.py, pipeline size 1: 4 iterations, saved at 2 and 4,
    with the trained model's logits."""
    root = tmp_path_factory.mktemp("stag")
    out = launch(ENTRY, [*flags(root / "ckpt", 4, *STAG.split()), "--save-interval", 2],
                 checkout, env={"STAG_TEST_LOGITS": str(root / "logits.pt")})
    return {"ckpt": root / "ckpt", "out": out, "losses": losses(out), "log": out[-1],
            "logits": torch.load(root / "logits.pt")}


def test_entry_trains_a_stagformer(stag_run):
    assert "building StagGPTModel (2 sections, shared weights)" in stag_run["log"]
    found = stag_run["losses"]
    assert sorted(found) == [1, 2, 3, 4]
    assert found[4] < found[1]  # mock data is learnable


def assert_continues(resumed: list, full: dict, rel: float) -> None:
    """A run resumed at iteration 2 went where the uninterrupted one went: the same loss at 3
    (Megatron-LM's log of 4 is the mean of 3 and 4 after a resume), the same gradient norms at
    3 and 4 (so the same weights before each update: optimizer state and schedule restored)
    and the same validation loss after 4."""
    expected = full["out"]
    assert losses(resumed)[3] == pytest.approx(losses(expected)[3], rel=rel)
    found, wanted = grad_norms(resumed), grad_norms(expected)
    for it in (3, 4):
        assert found[it] == pytest.approx(wanted[it], rel=max(rel, 1e-3)), (found, wanted)
    assert validation_loss(resumed) == pytest.approx(validation_loss(expected), rel=rel)


def test_resume_from_megatron_lm_checkpoint_continues_the_run(checkout, stag_run, tmp_path):
    """load_checkpoint of iteration 2 (model, optimizer, scheduler, data position) continues
    exactly where the uninterrupted run went, to the trained model's logits."""
    out = launch(ENTRY, flags(None, 4, "--load", stag_run["ckpt"], "--ckpt-step", 2,
                              *STAG.split()), checkout,
                 env={"STAG_TEST_LOGITS": str(tmp_path / "logits.pt")})
    assert "loaded checkpoint" in "".join(out).lower()
    assert_continues(out, stag_run, rel=1e-6)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), stag_run["logits"],
                               rtol=1e-5, atol=1e-5)


def test_pipeline_parallel_resume_matches(checkout, stag_run, tmp_path):
    """The same resume on 2 pipeline stages (one section each, the shared weights replicated
    on both): the replica-gradient sum inside Megatron-LM's train_step keeps the copies equal,
    so the run continues as on one stage."""
    out = launch(ENTRY, flags(None, 4, "--load", stag_run["ckpt"], "--ckpt-step", 2,
                              "--pipeline-model-parallel-size", 2, *STAG.split()),
                 checkout, world=2)
    assert_continues(out, stag_run, rel=1e-4)


def test_pipeline_parallel_replicas_stay_equal_without_the_sum_they_drift(checkout, stag_run,
                                                                           tmp_path):
    """The replica-gradient sum is what keeps the run equal: with it switched off
    (STAG_TEST_NO_REPLICA_SYNC) each stage updates its copy of the shared weights with its own
    gradient, and the run no longer continues as on one stage."""
    out = launch(ENTRY, flags(None, 4, "--load", stag_run["ckpt"], "--ckpt-step", 2,
                              "--pipeline-model-parallel-size", 2, *STAG.split()),
                 checkout, world=2, env={"STAG_TEST_NO_REPLICA_SYNC": "1"})
    with pytest.raises(AssertionError):
        assert_continues(out, stag_run, rel=1e-4)


def test_stagformer_trained_by_megatron_lm_converts_to_inference(stag_run, tmp_path):
    """stag convert to-inference reads Megatron-LM's checkpoint (its args in the common state);
    the inference folder's reference model gives the training model's logits."""
    from stag_plugin.convert.inference_folder import load_inference_folder

    out = tmp_path / "inference"
    assert cli.main(["convert", "to-inference", "--load", str(stag_run["ckpt"]), "--out",
                     str(out), "--no-progress"]) == 0
    expected = stag_run["logits"]
    model = load_inference_folder(out).model
    with torch.no_grad():
        logits = model(expected["tokens"])
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ pretrain_gpt.py + patch


GPT = ("--normalization RMSNorm --norm-epsilon 1e-2 --swiglu --disable-bias-linear "
       "--group-query-attention --num-query-groups 2 --untie-embeddings-and-output-weights")


@pytest.fixture(scope="module")
def patched_script(checkout, tmp_path_factory) -> Path:
    """The checkout's pretrain_gpt.py with the patch of its release line applied (a copy)."""
    line = release_line(checkout_version(checkout))
    patch = REPO / "patches" / f"pretrain_gpt.core_v{line}.patch"
    assert patch.is_file(), f"no patch for Megatron-LM {line}"
    folder = tmp_path_factory.mktemp("patched")
    (folder / "pretrain_gpt.py").write_bytes((checkout / "pretrain_gpt.py").read_bytes())
    check = subprocess.run(["git", "apply", "--check", "-v", str(patch)], cwd=folder,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    subprocess.run(["git", "apply", str(patch)], cwd=folder, check=True)
    return folder / "pretrain_gpt.py"


@pytest.fixture(scope="module")
def gpt_run(checkout, tmp_path_factory) -> dict:
    """Megatron-LM's own pretrain_gpt.py, unpatched: a GPT with non-default architecture flags,
    3 iterations, saved, with its logits."""
    root = tmp_path_factory.mktemp("gpt")
    out = launch(checkout / "pretrain_gpt.py", flags(root / "ckpt", 3, *GPT.split()), checkout,
                 env={"STAG_TEST_LOGITS": str(root / "logits.pt")})
    return {"ckpt": root / "ckpt", "log": out[-1], "logits": torch.load(root / "logits.pt")}


def test_patched_script_without_stag_flags_trains_the_same_gpt(checkout, patched_script,
                                                                gpt_run, tmp_path):
    out = launch(patched_script, flags(None, 3, *GPT.split()), checkout)
    assert "StagGPTModel" not in out[-1]
    assert LOSS_VALUES(out[-1]) == LOSS_VALUES(gpt_run["log"])  # the logged digits, exactly


def LOSS_VALUES(log: str) -> list:  # noqa: N802
    return re.findall(r"\| lm loss: ([0-9.E+-]+) \|", log)


def test_patched_script_with_stag_flags_trains_the_entrys_stagformer(checkout, patched_script,
                                                                    stag_run, tmp_path):
    out = launch(patched_script, flags(None, 4, *STAG.split()), checkout)
    assert "building StagGPTModel" in out[-1]
    close(losses(out), stag_run["losses"], (1, 2, 3, 4), rel=1e-6)


def test_gpt_saved_by_megatron_lm_upcycles(gpt_run, tmp_path):
    """stag convert from-gpt reads every architecture field under Megatron-LM's stored name
    (here --norm-epsilon 1e-2 as `layernorm_epsilon`, RMSNorm, SwiGLU, no biases, GQA, an untied
    head) and the tokenizer from its stored args (NullTokenizer, whose --vocab-size counts one
    id less up to Megatron-LM 0.17): the duplicate recipe gives exactly the GPT's logits."""
    out = tmp_path / "stag"
    assert cli.main(["convert", "from-gpt", "--load", str(gpt_run["ckpt"]), "--out", str(out),
                     "--recipe", "duplicate", "--stag-num-sections", "2", "--no-progress"]) == 0
    expected = gpt_run["logits"]
    model = generate.load_model(out).model
    positions = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        logits = model(expected["tokens"], positions)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)


def test_gpt_with_an_option_the_plugin_lacks_is_refused_by_flag(checkout, capsys, tmp_path):
    launch(checkout / "pretrain_gpt.py",
           flags(tmp_path / "ckpt", 2, "--qk-layernorm"), checkout)
    code = cli.main(["convert", "from-gpt", "--load", str(tmp_path / "ckpt"), "--out",
                     str(tmp_path / "out"), "--recipe", "duplicate", "--stag-num-sections", "2"])
    assert code != 0
    err = capsys.readouterr().err
    assert "--qk-layernorm=True" in err and "does not implement" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the patches, every tag

RELEASE_TAG = re.compile(r"^core_v(0\.1[6-9])\.\d+$")


def tagged_pretrain_gpt(checkout: Path) -> dict:
    """tag -> its pretrain_gpt.py, for the release tags 0.16 - 0.19 the checkout's git has."""
    tags = subprocess.run(["git", "tag", "-l", "core_v0.1*"], cwd=checkout, capture_output=True,
                          text=True).stdout.split()
    return {tag: subprocess.run(["git", "show", f"{tag}:pretrain_gpt.py"], cwd=checkout,
                                capture_output=True, check=True).stdout
            for tag in tags if RELEASE_TAG.match(tag)}


def test_each_patch_applies_to_its_line_only(checkout, tmp_path):
    """Every release tag in the checkout's git: the patch of its line applies, the others'
    are refused (so a wrong patch never half-applies)."""
    files = tagged_pretrain_gpt(checkout)
    if not files:
        pytest.skip("the checkout's git has no core_v0.16 - 0.19 release tags")
    for tag, text in files.items():
        line = RELEASE_TAG.match(tag).group(1)
        for patch in sorted((REPO / "patches").glob("pretrain_gpt.core_v*.patch")):
            folder = tmp_path / tag / patch.stem
            folder.mkdir(parents=True)
            (folder / "pretrain_gpt.py").write_bytes(text)
            check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=folder,
                                   capture_output=True, text=True)
            assert (check.returncode == 0) == (patch.name == f"pretrain_gpt.core_v{line}.patch"), \
                (tag, patch.name, check.stderr)
