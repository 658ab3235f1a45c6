"""Training a real model for one epoch: zhtune vs LLaMA-Factory vs TRL, same data, settings, tokens.

    python bench/train_real.py [--methods lora,full] [--records 200] [--systems all] [--rounds 1]
        [--lf-python /work/lf-venv/bin/python] [--workdir /tmp/zhtune-bench-real]

SmolLM2-135M-Instruct (the Hugging Face directory from ``tests/real_model.py``, copied with its
weights in bf16 as the published checkpoint has them: see :func:`bf16_copy`), the first
``--records`` records of LLaMA-Factory's ``alpaca_zh_demo.json``, the model's own chat template,
cutoff 512, batch 4, 1 epoch, bf16, cosine schedule without warm-up, seed 42, each tool's
padding-free packing. LoRA: r 8, alpha 16, dropout 0, every linear layer, lr 2e-4; full fine-tuning
(``--methods lora,full``): lr 1e-5. Each job runs in its own process:

* zhtune through its CLI (``zhtune train key=value ...``): ``packing=true precision=bf16`` (on a
  CPU with AMX zhtune's native kernels run attention, the loss, RMSNorm, SwiGLU and the rotation,
  and the default ``compile: auto`` then compiles nothing for LoRA; elsewhere it compiles the
  RMSNorm kernel and attention's backward), again
  with ``compile=false`` (all eager) and with ``compile=true`` (each decoder block compiled); and
  unpacked, each batch padded to its longest row (``packing=false``: zhtune's default, as
  LLaMA-Factory's), with ``compile`` auto and false;
* LLaMA-Factory (``--lf-python``: the Python of its own environment; its rows are skipped when that
  is missing) as ``llamafactory-cli train CONFIG.yaml`` with ``neat_packing: true``; no
  ``template`` key, so it parses the tokenizer's own chat template (any named template would be
  another format than the model's); ``disable_gradient_checkpointing: true`` (its default is on,
  the others' off); and with ``neat_packing: false`` (padded, its default), the baseline of
  zhtune's padded rows;
* TRL's ``SFTTrainer`` (the Python running this script) with ``packing=True`` (``bfd``,
  padding-free) and without (padded to the longest in each batch); gradient checkpointing off and
  bf16 said explicitly. TRL computes the loss on every token of a ``messages`` record (prompt
  included: ``assistant_only_loss`` needs generation marks that this chat template lacks), the
  others on the replies only, so its final loss is not comparable with theirs.

Columns: the training loop's seconds as the tool reports it (zhtune: ``trainer_log.jsonl``, each
logged step's tokens over its tokens/s; HF Trainer: ``train_runtime``), the whole command's wall
time (start-up, tokenization and saving included), tokens/s = trained tokens / loop seconds with
the trained tokens counted once here for every system (the records rendered by the chat template,
each cut at the cutoff), the ratio to LLaMA-Factory's row of the same method, the epoch's model
FLOPs over the loop time and this machine's bf16 matmul peak, the highest of the run's
measurements (``train_throughput.peak_gflops`` before the first job and after each: on a shared
host they spread by 20-35% within minutes, and a low one would flatter the rows next to it; the
highest can only understate a row's share), counted two ways (:meth:`Work.flops`): 4 x params x tokens for LoRA
(forward, and the backward through the frozen weights; no weight gradients) and 6 x params x
tokens for full fine-tuning, params = every parameter with the tied embedding counted once (it is
the LM head's matmul); and with the rest of the model's matmuls, LoRA's adapters and attention's
products over each record's causal pairs (the issue's count, "plus attention"); peak RSS of the job's
process tree (summed, sampled every 0.2 s); the epoch mean loss = the mean of every step's logged
loss (each tool sees every record once, so this does not depend on the order it drew them in);
the final loss = mean of the last 10 steps' (which does: each tool shuffles and packs its own
way). Each job's output is kept in ``WORKDIR/NAME.log``, the numbers
in ``WORKDIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from train_throughput import peak_gflops, run_child, zhtune_log_seconds  # noqa: E402

LORA_RANK = 8
"""LoRA's rank (alpha twice it) in every system's job."""
LR = {"lora": 2e-4, "full": 1e-5}
#: final loss: mean of the last LAST_STEPS logged step losses
LAST_STEPS = 10


@dataclass
class Bench:
    """What every job shares."""

    model: Path
    """Hugging Face directory of SmolLM2-135M-Instruct."""
    alpaca: Path
    """LLaMA-Factory's alpaca_zh_demo.json (dataset_info.json beside it)."""
    messages: Path
    """The same first records as canonical ``{"messages": ...}`` JSON lines (for TRL)."""
    records: int
    batch: int
    cutoff: int
    workdir: Path
    lf_python: str


@dataclass
class System:
    key: str
    label: str
    run: Callable[[Bench, str, Path], dict]
    """(bench, method, output dir) -> the job's numbers (see :func:`result`)."""
    baseline: str = "llamafactory"
    """The LLaMA-Factory row its ratio is to: packed rows against neat packing, padded against padded."""


def result(info: dict, loop_s: float, steps: int, losses: list[float], own_tokens: int | None) -> dict:
    """A job's numbers, the same for every tool."""
    return {
        "loop_s": loop_s,
        "wall_s": info["wall_seconds"],
        "steps": steps,
        "losses": losses,
        "own_tokens": own_tokens,
        "peak_rss_mb": info["tree_peak_rss_mb"],
        "huge_pages_mb": info.get("huge_pages_mb", 0.0),
        **{k: info[k] for k in ("hidden", "trainable_dtype") if k in info},
    }


def zhtune_settings(b: Bench, method: str, out: Path) -> list[str]:
    """The ``key=value`` settings of the zhtune jobs (``bench/profile_step.py`` profiles these too)."""
    settings = [
        f"model={b.model}", f"data={b.alpaca}", f"max_samples={b.records}", f"output_dir={out}", "template=auto",
        f"method={method}", "epochs=1", f"batch_size={b.batch}", f"cutoff_len={b.cutoff}", f"lr={LR[method]}",
        "lr_scheduler=cosine", "warmup_ratio=0", "seed=42", "logging_steps=1", "packing=true", "precision=bf16",
        "overwrite=true",
    ]  # fmt: skip
    if method == "lora":  # zhtune's defaults, said here
        settings += [f"lora_rank={LORA_RANK}", f"lora_alpha={2 * LORA_RANK}", "lora_dropout=0", "lora_target=all"]
    return settings


def zhtune_run(*extra: str) -> Callable[[Bench, str, Path], dict]:
    def run(b: Bench, method: str, out: Path) -> dict:
        args = ["zhtune", "train", *zhtune_settings(b, method, out), *extra, "--no-progress"]
        info = run_child(args, log=out.with_suffix(".log"))
        loop_s, _, _ = zhtune_log_seconds(out)
        rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        steps = json.loads((out / "train_results.json").read_text())["steps"]
        return result(info, loop_s, steps, [r["loss"] for r in rows if "loss" in r], rows[-1]["tokens"])

    return run


def lf_config(b: Bench, method: str, out: Path) -> dict:
    """LLaMA-Factory's training YAML (no ``template``: it parses the tokenizer's chat template)."""
    config = {
        "model_name_or_path": str(b.model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": method,
        "dataset": "alpaca_zh_demo",
        "dataset_dir": str(b.alpaca.parent),
        "max_samples": b.records,
        "cutoff_len": b.cutoff,
        "neat_packing": True,
        "overwrite_cache": True,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": False,
        "report_to": "none",
        "per_device_train_batch_size": b.batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": LR[method],
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.0,
        "bf16": True,
        "use_cpu": True,
        "disable_gradient_checkpointing": True,
        "dataloader_num_workers": 0,
        "seed": 42,
    }
    if method == "lora":
        config |= {"lora_rank": LORA_RANK, "lora_alpha": 2 * LORA_RANK, "lora_dropout": 0.0, "lora_target": "all"}
    return config


def lf_run(packing: bool) -> Callable[[Bench, str, Path], dict]:
    def run(b: Bench, method: str, out: Path) -> dict:
        config = out.with_suffix(".yaml")
        keys = lf_config(b, method, out) | {"neat_packing": packing}
        config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
        info = run_child(["llamafactory", "train", str(config)], python=b.lf_python, log=out.with_suffix(".log"))
        metrics = json.loads((out / "all_results.json").read_text())
        state = json.loads((out / "trainer_state.json").read_text())
        losses = [r["loss"] for r in state["log_history"] if "loss" in r]
        return result(info, metrics["train_runtime"], state["global_step"], losses, None)

    return run


def trl_run(packing: bool) -> Callable[[Bench, str, Path], dict]:
    def run(b: Bench, method: str, out: Path) -> dict:
        options = {
            "bf16": True,
            "full": method == "full",
            "lr": LR[method],
            "logging_steps": 1,
            "scheduler": "cosine",
        }
        args = [
            "trl",
            str(b.model),
            str(b.messages),
            "0",
            str(b.batch),
            str(b.cutoff),
            "1" if packing else "0",
        ]
        info = run_child([*args, str(out), json.dumps(options)], log=out.with_suffix(".log"))
        return result(info, info["train_seconds"], info["steps"], info["losses"], info["tokens"])

    return run


SYSTEMS = [
    System("zhtune", "zhtune (packing, bf16, compile auto)", zhtune_run()),
    System("zhtune-eager", "zhtune (packing, bf16, compile=false)", zhtune_run("compile=false")),
    System("zhtune-compile", "zhtune (packing, bf16, compile=true: blocks)", zhtune_run("compile=true")),
    System("llamafactory", "LLaMA-Factory (neat_packing, bf16)", lf_run(packing=True)),
    System("zhtune-padded", "zhtune (padded, bf16, compile auto)", zhtune_run("packing=false"), "llamafactory-padded"),
    System(
        "zhtune-padded-eager", "zhtune (padded, bf16, compile=false)", zhtune_run("packing=false", "compile=false"),
        "llamafactory-padded",
    ),  # fmt: skip
    System("llamafactory-padded", "LLaMA-Factory (padded, bf16)", lf_run(packing=False), "llamafactory-padded"),
    System("trl-packed", "TRL SFTTrainer (bfd packing, bf16)", trl_run(packing=True)),
    System("trl-padded", "TRL SFTTrainer (padded, bf16)", trl_run(packing=False)),
]


@dataclass(frozen=True)
class Work:
    """An epoch's work, counted once for every system: the trained tokens (each record rendered by
    the model's chat template, cut at the cutoff), how many records were cut, the model's
    parameters (tied weights once), LoRA's adapter parameters (rank :data:`LORA_RANK` on every
    linear layer of the decoder blocks), and attention's query-key pairs summed over the records
    (a record of ``L`` tokens: ``L (L + 1) / 2``, its causal pairs; packing's block-diagonal mask
    attends exactly these) times layers x query heads x head dim."""

    tokens: int
    cut: int
    params: int
    adapter_params: int
    attention: int

    def flops(self, method: str, with_attention: bool) -> float:
        """The epoch's matmul FLOPs, 2 per multiply-add. Without attention (the count this
        benchmark printed before it had both): 4 x params x tokens for LoRA (forward, and the backward through the frozen weights:
        no weight gradients), 6 x for full fine-tuning. With it, the rest of the model's matmuls
        too: LoRA's adapters (6 x their parameters x tokens: forward, input and weight gradients)
        and attention's products (4 per pair and head dim forward, ``QK^T`` and ``PV``; 8 backward,
        ``dV``, ``dP``, ``dQ``, ``dK``), never the backward's recomputation of the scores."""
        dense = (4 if method == "lora" else 6) * self.params * self.tokens
        if not with_attention:
            return dense
        adapters = 6 * self.adapter_params * self.tokens if method == "lora" else 0
        return dense + adapters + 12 * self.attention


def prepare(data: Path, records: int, cutoff: int, workdir: Path) -> tuple[Path, Path, Work]:
    """The model directory, the first ``records`` records as canonical messages, and the epoch's
    :class:`Work`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tests.real_model import smollm2_dir
    from zhtune.data.convert import convert_files

    workdir.mkdir(parents=True, exist_ok=True)
    model = bf16_copy(smollm2_dir(), workdir / "SmolLM2-135M-Instruct-bf16")
    first = workdir / f"alpaca_first{records}.json"
    first.write_text(json.dumps(json.loads(data.read_text(encoding="utf-8"))[:records], ensure_ascii=False))
    messages = workdir / f"messages_first{records}.jsonl"
    convert_files([str(first)], str(messages), progress=False, allow_rejects=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = []
    for line in messages.read_text(encoding="utf-8").splitlines():
        text = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in net.parameters())
    linear = [m for m in net.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pairs = sum(min(n, cutoff) * (min(n, cutoff) + 1) // 2 for n in lengths)
    return model, messages, Work(
        tokens=sum(min(n, cutoff) for n in lengths),
        cut=sum(n > cutoff for n in lengths),
        params=params,
        adapter_params=LORA_RANK * sum(m.in_features + m.out_features for m in linear),
        attention=pairs * config.num_hidden_layers * config.num_attention_heads * head_dim,
    )


def bf16_copy(source: Path, dest: Path) -> Path:
    """``source`` with its weights in bf16 and ``dtype: bfloat16`` in its config, as the published
    checkpoint has them (the dequantized GGUF directory says float32): LLaMA-Factory loads the
    config's dtype, so every tool starts from the same bf16 weights (kept frozen in bf16 by LoRA,
    upcast to fp32 for full fine-tuning)."""
    from safetensors.torch import load_file, save_file

    if (dest / "model.safetensors").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy2(f, dest / f.name)
    config = json.loads((source / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2))
    weights = {
        k: v.bfloat16() if v.is_floating_point() else v
        for k, v in load_file(source / "model.safetensors").items()
    }
    save_file(weights, str(dest / "model.safetensors.part"), metadata={"format": "pt"})
    (dest / "model.safetensors.part").rename(dest / "model.safetensors")
    return dest


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def baseline_key(r: dict) -> tuple[str, str, int]:
    """The row a result's ratio is taken against: its baseline system, method and round."""
    return r.get("baseline", "llamafactory"), r["method"], r.get("round", 0)


def table(rows: list[dict], work: Work, peak: float) -> list[str]:
    """The markdown table of the finished (or failed) jobs, their roofline against ``peak``."""
    lines = [
        "| system | steps | train loop s | wall s | tokens/s | vs LLaMA-Factory "
        "| % of bf16 roofline, 4N / 6N | % of bf16 roofline, all matmuls | peak RSS GiB | epoch mean loss | final loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    baselines = {s.baseline for s in SYSTEMS}
    tokens = work.tokens
    lf = {(r["key"], r["method"], r.get("round", 0)): tokens / r["loop_s"] for r in rows if r["key"] in baselines and "loop_s" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | | | | | |")
            continue
        tps = tokens / r["loop_s"]
        base = baseline_key(r)
        ratio = f"{tps / lf[base]:.2f}x" if base in lf else "-"
        mean, last = (_mean(r["losses"]), _mean(r["losses"][-LAST_STEPS:]))
        roof = [work.flops(r["method"], full) / (r["loop_s"] * peak * 1e9) for full in (False, True)]
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['loop_s']:.1f} | {r['wall_s']:.1f} | {tps:,.0f} | {ratio} "
            f"| {roof[0]:.1%} | {roof[1]:.1%} | {r['peak_rss_mb'] / 1024:.2f} | {mean:.4f} | {last:.4f} |"
        )
    return lines


def rounds_table(rows: list[dict]) -> list[str]:
    """With several rounds: each system's loop seconds and ratio to its baseline in every round
    (the baseline of the same round, run next to it), and their medians."""
    by_system: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "loop_s" in r:
            by_system.setdefault((r["key"], r["method"]), []).append(r)
    loops = {(key, method, r["round"]): r["loop_s"] for (key, method), rs in by_system.items() for r in rs}
    lines = [
        "| system | method | loop s, each round | median loop s | vs LLaMA-Factory, each round | median ratio |",
        "| --- | --- | --- | ---: | --- | ---: |",
    ]
    for (_, method), rs in by_system.items():
        each = [r["loop_s"] for r in rs]
        ratios = [loops[baseline_key(r)] / r["loop_s"] for r in rs if baseline_key(r) in loops]
        label = rs[0]["label"].split(" [round")[0]
        lines.append(
            f"| {label} | {method} | {', '.join(f'{x:.1f}' for x in each)} | {statistics.median(each):.1f} "
            f"| {', '.join(f'{x:.2f}x' for x in ratios) or '-'} | {f'{statistics.median(ratios):.2f}x' if ratios else '-'} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/llamafactory/alpaca_zh_demo.json"))
    p.add_argument("--records", type=int, default=200, help="the first N records (200)")
    p.add_argument("--methods", default="lora", help="lora, full or lora,full")
    p.add_argument("--systems", default="all", help=f"all or some of {','.join(s.key for s in SYSTEMS)}")
    p.add_argument(
        "--lf-python", default="/work/lf-venv/bin/python", help="Python of LLaMA-Factory's environment"
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=512)
    p.add_argument("--peak-seconds", type=float, default=1.5, help="seconds of each matmul peak measurement")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the systems this many times, in the given order then reversed, alternately; each "
        "ratio is to the baseline of its own round (this machine's speed drifts within minutes)",
    )
    p.add_argument("--workdir", default="/tmp/zhtune-bench-real")
    p.add_argument("--table-from", help="print the table of a run's results.json again, running nothing")
    a = p.parse_args()
    if a.table_from:
        done = json.loads(Path(a.table_from).read_text())
        if "work" not in done:
            p.error(f"--table-from: {a.table_from} is from an older version of this script (no 'work'); run it again")
        print("\n".join(table(done["rows"], Work(**done["work"]), max(done["peaks"]))))
        if len({r.get("round", 0) for r in done["rows"]}) > 1:
            print("\n" + "\n".join(rounds_table(done["rows"])))
        return

    keys = [s.key for s in SYSTEMS] if a.systems == "all" else a.systems.split(",")
    by_key = {s.key: s for s in SYSTEMS}
    if unknown := [k for k in keys if k not in by_key]:
        p.error(f"--systems: unknown {', '.join(unknown)} (known: {', '.join(by_key)})")
    systems = [by_key[k] for k in keys]  # in the order given: the machine drifts, so order is a choice
    if any(k.startswith("llamafactory") for k in keys) and not Path(a.lf_python).exists():
        print(
            f"LLaMA-Factory rows skipped: {a.lf_python} not found (python3 -m venv /work/lf-venv && "
            "/work/lf-venv/bin/pip install -c bench/llamafactory-constraints.txt llamafactory==0.9.5)",
            file=sys.stderr,
        )
        systems = [s for s in systems if not s.key.startswith("llamafactory")]
    workdir = Path(a.workdir)
    model, messages, work = prepare(Path(a.data), a.records, a.cutoff, workdir)
    b = Bench(model, Path(a.data), messages, a.records, a.batch, a.cutoff, workdir, a.lf_python)
    peaks = [peak_gflops("bf16", a.peak_seconds)]  # (and after each job)
    rows = []
    for method in a.methods.split(","):
        for rnd in range(a.rounds):
            for s in systems if rnd % 2 == 0 else systems[::-1]:
                label = s.label if method == "lora" else s.label.replace(" (", " full (", 1)
                label += f" [round {rnd + 1}]" if a.rounds > 1 else ""
                out = workdir / (f"{method}-{s.key}" + (f"-r{rnd + 1}" if a.rounds > 1 else ""))
                shutil.rmtree(out, ignore_errors=True)
                row = {"key": s.key, "label": label, "method": method, "baseline": s.baseline, "round": rnd}
                try:
                    row |= s.run(b, method, out)
                    peaks.append(peak_gflops("bf16", a.peak_seconds))
                    print(
                        f"  {label}: {row['loop_s']:.1f} s loop, {row['wall_s']:.1f} s wall, "
                        f"{row['huge_pages_mb'] / 1024:.2f} GiB in huge pages at its end; "
                        f"bf16 peak after it {peaks[-1]:,.0f} GFLOP/s",
                        file=sys.stderr,
                    )
                except Exception as e:  # a failed job is reported in its row; the others still run
                    row["error"] = [line for line in str(e).splitlines() if line.strip()][-1][:160]
                    print(f"  {label} failed (log: {out.with_suffix('.log')}):\n{e}", file=sys.stderr)
                rows.append(row)
    (workdir / "results.json").write_text(
        json.dumps({"work": asdict(work), "peaks": peaks, "rows": rows}, indent=1)
    )

    print(
        f"\nSmolLM2-135M-Instruct ({work.params / 1e6:.1f}M params), first {a.records} records of {Path(a.data).name}: "
        f"{work.tokens:,} trained tokens under its chat template ({work.cut} records cut at {a.cutoff}), 1 epoch, batch "
        f"{a.batch}, bf16; LoRA r{LORA_RANK}/alpha {2 * LORA_RANK}/all linear lr {LR['lora']}, full lr {LR['full']}; "
        f"model FLOPs 4N / 6N {work.flops('lora', False):.3g} / {work.flops('full', False):.3g}, "
        f"all matmuls {work.flops('lora', True):.3g} / {work.flops('full', True):.3g}; bf16 matmul peak "
        f"{max(peaks):,.0f} GFLOP/s, the highest of {len(peaks)} measurements in this run (lowest {min(peaks):,.0f})\n"
    )
    print("\n".join(table(rows, work, max(peaks))))
    if a.rounds > 1:
        print(f"\nOver {a.rounds} rounds (odd rounds in the given order, even rounds reversed):\n")
        print("\n".join(rounds_table(rows)))
    own = ", ".join(f"{r['label']} {int(r['own_tokens']):,}" for r in rows if r.get("own_tokens"))
    if own:
        print(f"\nTrained tokens as each tool counted them (non-pad inputs; LLaMA-Factory logs none): {own}")
    hidden = sorted({name for r in rows for name in r.get("hidden", [])})
    if hidden:
        print(
            f"LLaMA-Factory ran without {' and '.join(hidden)}"
            + (" (an empty torchaudio module stands in)" if "torchaudio" in hidden else "")
            + ": PyPI's CUDA builds do not load beside the CPU torch (see bench/_child.py run_llamafactory)."
        )


if __name__ == "__main__":
    main()
