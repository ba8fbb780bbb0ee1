"""Hostile and damaged checkpoints, and bad input to every command: each is refused with one
`stag <command>: error: <problem>. Fix: <fix>` line (exit code 2); nothing runs code from a
checkpoint, loads damaged or partial weights, or overwrites a run."""

import argparse
import contextlib
import io
import pickle
from pathlib import Path

import pytest
import torch
from test_gpt_parity import megatron_gpt

from stag_plugin import cli
from stag_plugin.training import integrity

from convert_testing import iteration_folder, megatron_lm_args, save_megatron_lm
from stag_testing import build_model, prepared_cache, small_corpus, tiny_config, tiny_train_flags

VOCAB = 512


class Payload:
    """Unpickling it creates `marker`: the stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory, "faults")


@pytest.fixture(scope="module")
def flags(tmp_path_factory, corpus) -> list:
    cache, _ = prepared_cache(tmp_path_factory, corpus, VOCAB)
    return [*tiny_train_flags(corpus, cache, VOCAB), "--micro-batch-size", "4",
            "--train-iters", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, flags) -> Path:
    """A finished 2-iteration run (read, never written, by the tests: they copy it)."""
    save = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["train", *flags, "--save", str(save)]) == 0
    return save


def copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "copy"))


def error_line(capsys, argv) -> str:
    """Run `stag <argv>`; it must fail with exactly one clear error line."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"stag {argv[0]}: error: ")]
    assert code == 2 and len(lines) == 1 and ". Fix: " in lines[0], err
    return lines[0]


# ---------------------------------------------------------------------------- planting


def plant_index(folder: Path, marker: Path) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    resign(folder)


def resign(folder: Path) -> None:
    """What an attacker would do too: a manifest that matches the planted files (the manifest
    guards against damage, not against someone who can write the folder)."""
    if (folder / integrity.MANIFEST).exists():
        integrity.write_manifest(folder)


def plant_entry(folder: Path, prefix: str, marker: Path) -> str:
    """Point the first byte entry whose key starts with `prefix` at a torch.save payload."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    key = next(k for k, v in metadata.state_dict_metadata.items()
               if k.startswith(prefix) and isinstance(v, BytesStorageMetadata))
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    (folder / "evil.distcp").write_bytes(buffer.getvalue())
    for index in list(metadata.storage_data):
        if index.fqn == key:
            metadata.storage_data[index] = _StorageInfo("evil.distcp", 0, len(buffer.getvalue()))
    with open(folder / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    resign(folder)
    return key


def plant_common(folder: Path, marker: Path) -> None:
    """The common state: common.pt (megatron-core <= 0.18) or the 'common_state' entry."""
    if (folder / "common.pt").exists():
        torch.save(Payload(marker), folder / "common.pt")
        resign(folder)
    else:
        plant_entry(folder, "common_state", marker)


# ---------------------------------------------------------------------------- (1) no code runs


LOADS = {
    "eval": lambda load, out: ["eval", "--load", load, "--eval-iters", "1"],
    "generate": lambda load, out: ["generate", "--load", load, "--prompt", "def f(",
                                   "--max-new-tokens", "2"],
    "to-inference": lambda load, out: ["convert", "to-inference", "--load", load, "--out", out],
    "reshard": lambda load, out: ["convert", "reshard", "--load", load, "--out", out,
                                  "--no-progress"],
}
# The files each command reads (a weights-only load reads no RNG state; to-inference reads the
# tensors alone).
READS = {"eval": {"index", "extra-state", "common-state"},
         "generate": {"index", "extra-state", "common-state"},
         "reshard": {"index", "extra-state", "common-state"},
         "to-inference": {"index"}}
PLANTS = {
    "index": plant_index,
    "extra-state": lambda folder, marker: plant_entry(folder, "sections.0.layers.0", marker),
    "rng-state": lambda folder, marker: plant_entry(folder, "rng_state", marker),
    "common-state": plant_common,
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
@pytest.mark.parametrize("command", sorted(LOADS))
def test_a_planted_payload_never_runs(capsys, tmp_path, run, command, plant):
    folder = copy_run(run, tmp_path)
    marker = tmp_path / "PWNED"
    PLANTS[plant](iteration_folder(folder), marker)
    argv = LOADS[command](folder, tmp_path / "out")
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert not marker.exists(), f"{command} ran code planted in the {plant}"
    if plant in READS[command]:
        assert code == 2 and "Fix: " in err and "--trust-checkpoint-code" in err, err
        assert "io.open" in err, err
    else:  # the command never reads that file
        assert code == 0, err


def test_resume_refuses_a_planted_payload(capsys, tmp_path, run, flags):
    folder = copy_run(run, tmp_path)
    marker = tmp_path / "PWNED"
    plant_entry(iteration_folder(folder), "rng_state", marker)
    line = error_line(capsys, ["train", *flags, "--load", folder, "--save", folder])
    assert not marker.exists()
    assert "io.open" in line and "--trust-checkpoint-code" in line


def test_trust_checkpoint_code_is_the_way_past_the_check(capsys, tmp_path, run):
    folder = copy_run(run, tmp_path)
    marker = tmp_path / "PWNED"
    plant_entry(iteration_folder(folder), "sections.0.layers.0", marker)
    with contextlib.suppress(Exception):  # the payload is no RNG state: the load fails after
        cli.main(["eval", "--load", str(folder), "--eval-iters", "1",
                  "--trust-checkpoint-code"])
    assert marker.exists()  # the user said so: full unpickling, as torch does


def test_a_megatron_lm_source_with_a_planted_common_state(capsys, tmp_path):
    """stag convert from-gpt reads Megatron-LM's args from the common state."""
    config = tiny_config(num_sections=1, num_layers=2, hidden_size=32)
    gpt = megatron_gpt(config, tie=False, vocab=VOCAB, max_len=32)
    source = save_megatron_lm(gpt, tmp_path / "gpt", 1, megatron_lm_args(config, tie=False))
    marker = tmp_path / "PWNED"
    plant_common(iteration_folder(source), marker)
    line = error_line(capsys, ["convert", "from-gpt", "--load", source, "--out", tmp_path / "out",
                               "--recipe", "duplicate", "--stag-num-sections", "2",
                               "--tokenizer-model", tmp_path / "none.model"])
    assert not marker.exists()
    assert "io.open" in line and "--trust-checkpoint-code" in line


# ---------------------------------------------------------------------------- (2) integrity


def flip_bytes(path: Path, count: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def largest_shard(folder: Path) -> Path:
    return max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


DAMAGE = {
    "flipped": (lambda f: flip_bytes(largest_shard(f)), "has changed since it was saved"),
    "truncated": (lambda f: largest_shard(f).write_bytes(largest_shard(f).read_bytes()[:100]),
                  "truncated"),
    "deleted": (lambda f: largest_shard(f).unlink(), "is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["eval", "generate", "to-inference", "reshard"])
def test_damaged_files_are_named_before_any_tensor_is_used(capsys, tmp_path, run, command,
                                                           damage):
    folder = copy_run(run, tmp_path)
    shard = largest_shard(iteration_folder(folder))
    DAMAGE[damage][0](iteration_folder(folder))
    line = error_line(capsys, LOADS[command](folder, tmp_path / "out"))
    assert shard.name in line and DAMAGE[damage][1] in line, line
    assert not (tmp_path / "out").exists()


def test_resume_names_a_damaged_file(capsys, tmp_path, run, flags):
    folder = copy_run(run, tmp_path)
    flip_bytes(largest_shard(iteration_folder(folder)))
    line = error_line(capsys, ["train", *flags, "--load", folder, "--save", folder])
    assert "has changed since it was saved" in line


def test_a_checkpoint_without_manifest_loads_with_a_warning(capsys, tmp_path, run):
    folder = copy_run(run, tmp_path)
    (iteration_folder(folder) / integrity.MANIFEST).unlink()
    with pytest.warns(UserWarning, match="has no manifest.json"):
        assert cli.main(["eval", "--load", str(folder), "--eval-iters", "1"]) == 0


def test_every_save_writes_a_manifest_of_every_file(run):
    folder = iteration_folder(run)
    listed = set(__import__("json").loads((folder / integrity.MANIFEST).read_text())["files"])
    assert listed == {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file()} - {integrity.MANIFEST}
    assert {"tokenizer/tokenizer.model", "tokenizer/stag_tokenizer.json"} <= listed
    assert integrity.verify_manifest(folder)


@pytest.mark.parametrize("command", ["eval", "generate", "to-inference", "reshard"])
def test_a_changed_tokenizer_file_is_named(capsys, tmp_path, run, command):
    """The ids mean nothing with another tokenizer: its files are checked like the shards."""
    folder = copy_run(run, tmp_path)
    flip_bytes(iteration_folder(folder) / "tokenizer" / "tokenizer.model", count=16)
    line = error_line(capsys, LOADS[command](folder, tmp_path / "out"))
    assert "tokenizer/tokenizer.model" in line and "changed" in line, line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- (3) strict loads


def edit_record(folder: Path, **changes) -> None:
    import json

    path = iteration_folder(folder) / "stag_run.json"
    record = json.loads(path.read_text())
    record["args"].update(changes)
    record["architecture"].update(changes)
    path.write_text(json.dumps(record))
    integrity.write_manifest(iteration_folder(folder))  # consistent files, wrong architecture


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_record_edited_to_shared_weights_is_refused(capsys, tmp_path, run, command):
    folder = copy_run(run, tmp_path)
    edit_record(folder, stag_weight_sharing="shared")
    line = error_line(capsys, LOADS[command](folder, tmp_path / "out"))
    assert "not expected" in line and "sections.1.layers" in line, line


def test_resume_with_an_edited_record_is_refused(capsys, tmp_path, run, flags):
    folder = copy_run(run, tmp_path)
    edit_record(folder, stag_weight_sharing="shared")
    line = error_line(capsys, ["train", *flags, "--stag-weight-sharing", "shared", "--load",
                               folder, "--save", folder])
    assert "not expected" in line, line


# ---------------------------------------------------------------------------- (4) no overwrite


def test_save_into_another_run_is_refused_and_touches_nothing(capsys, tmp_path, run, flags):
    from stag_testing import snapshot

    folder = copy_run(run, tmp_path)
    before = snapshot(folder)
    line = error_line(capsys, ["train", *flags, "--save", folder])
    assert "already holds a run" in line and "--overwrite" in line and f"--load {folder}" in line
    assert snapshot(folder) == before


def test_overwrite_replaces_the_old_run(capsys, tmp_path, run, flags):
    folder = copy_run(run, tmp_path)
    (folder / "iter_0000009").mkdir()  # a later checkpoint of the old run
    assert cli.main(["train", *flags, "--save", str(folder), "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000002"]
    assert (folder / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_resume_on_other_data_is_refused(capsys, tmp_path, run, flags, corpus):
    folder = copy_run(run, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    for source in sorted(corpus.iterdir())[:20]:
        (other / source.name).write_text(source.read_text())
    argv = [*flags, "--load", folder, "--save", folder]
    argv[argv.index("--data-path") + 1] = str(other)
    argv[argv.index("--data-cache-dir") + 1] = str(tmp_path / "cache")
    line = error_line(capsys, ["train", *argv])
    assert "is not the one saved with --load" in line, line


def test_demo_refuses_to_replace_an_earlier_demo(capsys, tmp_path):
    (tmp_path / "report.md").write_text("an earlier demo")
    line = error_line(capsys, ["demo", "--out", tmp_path, "--size", "small"])
    assert "already holds a demo" in line and "--overwrite" in line
    assert (tmp_path / "report.md").read_text() == "an earlier demo"


# ---------------------------------------------------------------------------- (5) typed presets


PRESETS = [
    ("bf16: \"no\"\n", "bf16: 'no' (str) is not true or false"),
    ("swiglu: \"false\"\n", "swiglu: 'false' (str) is not true or false"),
    ("train_iters: 4.5\n", "train_iters: 4.5 (float) is not an integer"),
    ("hidden_size: [64, 128]\n", "hidden_size: [64, 128] (list) is not an integer"),
    ("lr: true\n", "lr: True (bool) is not a number"),
    ("stag_weight_sharing: both\n", "stag_weight_sharing: 'both' (str) is not one of"),
    ("num_layers: 4\nnot_a_flag: 1\n", "unknown keys ['not_a_flag']"),
    ("num_layers: [4\n", "is not valid YAML at line"),
    ("- 4\n- 5\n", "expected a mapping of flag names to values"),
]


@pytest.mark.parametrize("text, words", PRESETS, ids=[p[1][:30] for p in PRESETS])
def test_a_bad_preset_is_one_clear_error(capsys, tmp_path, text, words):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    line = error_line(capsys, ["train", "--config", preset, "--save", tmp_path / "run"])
    assert words in line and str(preset) in line, line
    assert not (tmp_path / "run").exists()


def test_a_safe_checkpoint_read_leaves_torch_s_registered_safe_types_alone(tmp_path):
    """Megatron-Core registers argparse.Namespace as safe on import, and Megatron-LM's own
    loader relies on it after the plugin has read the same checkpoint's common state."""
    from stag_plugin.convert import source

    model = build_model(tiny_config())
    save_megatron_lm(model, tmp_path / "run", 1, megatron_lm_args(model.config, True))
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    source.read_common(iteration_folder(tmp_path / "run"))
    assert argparse.Namespace in torch.serialization.get_safe_globals()
