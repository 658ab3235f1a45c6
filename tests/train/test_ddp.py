"""Data-parallel training: 2 processes on CPU (gloo) under ``torchrun``, launched the way users
launch it (``zhtune train key=value ...``, here through ``zhtune.cli.main`` in a tiny wrapper
script that also records, per rank, what the model saw and the final weights).

Checks: both ranks end with identical weights (equal to the saved model/), only rank 0 writes
(one log row per step, one banner), and 2 processes x batch 4 equal 1 process x batch 8: the
ranks see disjoint halves of the same global batch, the loss/lr/token curve and the final
weights match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(
    sys.platform == "win32"
    or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

STEPS = 5
LAUNCHER_ENV = (
    "ACCELERATE_",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "TORCHELASTIC_",
)

# Runs `zhtune train ARGS...` in this process (any launcher), then writes, for this rank, into
# RECORD_DIR (outside the run directory): the final weights, every training sample the model saw
# (its unpadded input ids; rows with no labelled token, i.e. padding filler, are skipped), and
# every write into the run directory that Python's audit hooks saw this process make.
WRAPPER = """
import json, os, sys

import accelerate
import torch

from zhtune.cli import main

record_dir, argv = sys.argv[1], sys.argv[2:]
rank = int(os.environ.get("RANK", "0"))
run_dir = os.path.realpath(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))
prepared, seen, writes = [], [], []
original_prepare = accelerate.Accelerator.prepare
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def audit(event, args):
    try:
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        elif event in ("os.mkdir", "os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "shutil.move"):
            path, writing = args[0], True
        else:
            return
        if writing and not isinstance(path, int):
            path = os.path.realpath(os.fsdecode(path))
            if path == run_dir or path.startswith(run_dir + os.sep):
                writes.append(f"{event} {path}")
    except Exception:
        pass


sys.addaudithook(audit)


def record(module, args, kwargs):
    if module.training:
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):  # (every row has labels)
            seen.append(ids[mask.bool()].tolist())


def prepare(self, *args, **kwargs):
    result = original_prepare(self, *args, **kwargs)
    model = result[0] if isinstance(result, tuple) else result
    prepared.append((self, model))
    self.unwrap_model(model).register_forward_pre_hook(record, with_kwargs=True)
    return result


accelerate.Accelerator.prepare = prepare
status = main(["train", *argv])
accelerator, model = prepared[-1]
state = {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
torch.save(state, os.path.join(record_dir, f"weights-rank{rank}.pt"))
with open(os.path.join(record_dir, f"seen-rank{rank}.json"), "w") as f:
    json.dump(seen, f)
with open(os.path.join(record_dir, f"writes-rank{rank}.json"), "w") as f:
    json.dump(writes, f)
sys.exit(status)
"""


def train_args(model, data, out, batch_size: int) -> list[str]:
    return [
        f"model={model}", f"data={data}", f"output_dir={out}", "template=chatml", "method=full",
        f"max_steps={STEPS}", f"batch_size={batch_size}", "grad_accum=1", "lr=3e-3", "warmup_ratio=0.2",
        "lr_scheduler=cosine", "logging_steps=1", "cutoff_len=64", "--no-progress",
        "padding_free=false",  # one sample a row, as the recording hook reads them (each rank packs its own share)
    ]  # fmt: skip


def launch(tmp: Path, name: str, nproc: int, batch_size: int, tiny_model_dir, train_file):
    """Train under ``torchrun --nproc_per_node nproc`` (plain ``python`` for 1); return the run
    directory, the record directory and the combined output."""
    tmp.mkdir(parents=True, exist_ok=True)
    script = tmp / "wrapper.py"
    script.write_text(WRAPPER, encoding="utf-8")
    out, record = tmp / name, tmp / f"{name}-record"
    record.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_ENV)}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")  # plain torchrun, as users run it
    launcher = [sys.executable]
    if nproc > 1:  # --standalone: a private rendezvous on a free localhost port
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(script), str(record), *train_args(tiny_model_dir, train_file, out, batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return out, record, output


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir, train_file):
    """2 processes x batch 4."""
    return launch(tmp_path_factory.mktemp("ddp"), "run", 2, 4, tiny_model_dir, train_file)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_model_dir, train_file):
    """1 process x batch 8: the same global batch."""
    return launch(tmp_path_factory.mktemp("single"), "run", 1, 8, tiny_model_dir, train_file)


def log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]


def test_ranks_agree_and_only_rank_0_writes(ddp_run, tiny_model_dir):
    run, record, output = ddp_run
    # two processes trained, and they end with bit-identical weights ...
    w0, w1 = torch.load(record / "weights-rank0.pt"), torch.load(record / "weights-rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # ... which are the weights rank 0 saved, and training changed them
    saved = load_file(run / "model" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    for k, v in saved.items():
        assert torch.equal(v, w0[k]), k
        assert not torch.equal(v, base[k]), k
    # one writer: rank 1 never wrote into the run directory (rank 0 did: the hook works) ...
    assert json.loads((record / "writes-rank1.json").read_text()) == []
    writes = json.loads((record / "writes-rank0.json").read_text())
    assert any(w.endswith("trainer_log.jsonl") for w in writes), writes
    # ... one banner, one summary, one log row per step, one complete run directory
    assert output.count("zhtune train: sft full") == 1, output
    assert "(batch 4 x accum 1 x 2 proc)" in output
    assert output.count("done in ") == 1, output
    assert [r["step"] for r in log_rows(run)] == list(range(1, STEPS + 1))
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "trainer_log.jsonl", "model", "train_results.json", "loss.png"} <= names
    assert json.loads((run / "train_results.json").read_text())["steps"] == STEPS


def test_ranks_see_disjoint_halves_of_the_global_batch(ddp_run, single_run):
    seen0 = json.loads((ddp_run[1] / "seen-rank0.json").read_text())
    seen1 = json.loads((ddp_run[1] / "seen-rank1.json").read_text())
    reference = json.loads((single_run[1] / "seen-rank0.json").read_text())
    assert len(reference) == 8 * STEPS
    assert len(seen0) == len(seen1) == 4 * STEPS
    as_set = [Counter(map(tuple, s)) for s in (seen0, seen1, reference)]
    assert not as_set[0] & as_set[1], "both ranks trained on the same samples"
    assert as_set[0] + as_set[1] == as_set[2]


def test_two_processes_x_batch_4_equal_one_process_x_batch_8(ddp_run, single_run):
    ddp, single = log_rows(ddp_run[0]), log_rows(single_run[0])
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    for key in ("loss", "lr", "epoch", "tokens"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in single], rel=1e-4), key
    wd = load_file(ddp_run[0] / "model" / "model.safetensors")
    ws = load_file(single_run[0] / "model" / "model.safetensors")
    assert wd.keys() == ws.keys()
    for k in wd:
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-4, atol=1e-5)


LAUNCHER_CONFIGS = Path(__file__).parents[2] / "src" / "zhtune" / "configs" / "accelerate"


@pytest.mark.parametrize(
    "name, kind",
    [
        ("ddp", "MULTI_GPU"),
        ("fsdp", "FSDP"),
        ("fsdp2", "FSDP"),
        ("deepspeed_zero2", "DEEPSPEED"),
        ("deepspeed_zero3", "DEEPSPEED"),
    ],
)
def test_shipped_launcher_configs_are_what_accelerate_launch_reads(name, kind, monkeypatch):
    """`accelerate launch --config_file <shipped yaml>` accepts each file (accelerate rejects
    unknown keys) and turns it into the intended plugin. Uses accelerate's own launch code, up to
    the point where it would start processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = LAUNCHER_CONFIGS / f"{name}.yaml"
    argv = ["--config_file", str(path), "--num_processes", "2", "-m", "zhtune", "train", "run.yaml"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert defaults.distributed_type.value == kind
    assert args.module and args.training_script == "zhtune"
    assert defaults.mixed_precision is None  # zhtune's `precision` key decides
    if kind == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    if name == "fsdp":
        from torch.distributed.fsdp import ShardingStrategy, StateDictType
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # true needs a GPU to construct
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 1 and plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
        assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
        assert plugin.transformer_cls_names_to_wrap is None  # from the model's _no_split_modules
        assert plugin.use_orig_params and plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    elif name == "fsdp2":
        from torch.distributed.fsdp import StateDictType
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = FullyShardedDataParallelPlugin()  # constructs on a CPU (tests/train/test_fsdp.py runs it)
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
        assert plugin.transformer_cls_names_to_wrap is None
        assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
        assert not plugin.cpu_ram_efficient_loading  # the launcher's default is true
    elif kind == "DEEPSPEED":
        ds = DeepSpeedPlugin().deepspeed_config
        assert ds["zero_optimization"]["stage"] == int(name[-1])
        # filled by zhtune from batch_size / grad_accum / max_grad_norm
        assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
        assert ds["gradient_clipping"] == "auto"
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (name.endswith("3"))
