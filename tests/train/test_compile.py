"""compile: auto resolves per device; kernels compiles the fused RMSNorm only; true compiles the
decoder blocks one by one, one batch shape; each trains as eager does."""

from __future__ import annotations

import json

import pytest

from tests.train.test_packing import cfg, losses, mixed_length_data
from zhtune.data.batching import micro_batches
from zhtune.errors import ZhtuneError
from zhtune.models.tiny import build_tiny_model
from zhtune.train import compile as compile_mod
from zhtune.train.compile import blocks_repay, check_compile, compile_mode, decoder_blocks
from zhtune.train.sft import train


@pytest.mark.parametrize(("family", "n_layers"), [("llama", 2), ("bloom", 2), ("gpt_neox", 2)])
def test_decoder_blocks_are_the_layers_whatever_the_family_calls_them(family, n_layers, tiny_tokenizer):
    model = build_tiny_model(family, tiny_tokenizer)
    blocks = decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == n_layers
    assert "Layer" in type(blocks[0]).__name__ or "Block" in type(blocks[0]).__name__


def test_a_cpu_without_a_cpp_compiler_is_refused_at_start(monkeypatch):
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    with pytest.raises(ZhtuneError, match="config key 'compile'.*C\\+\\+ compiler"):
        check_compile("cpu")
    check_compile("cuda")  # Triton brings its own compiler


@pytest.mark.parametrize(
    ("setting", "device", "fused", "cxx", "long_run", "want"),
    [
        ("auto", "cpu", True, True, False, "kernels"),
        ("auto", "cpu", True, True, True, "blocks"),  # long enough to repay compiling the blocks
        ("auto", "cpu", False, True, True, "blocks"),
        ("auto", "cpu", True, False, True, "off"),  # no compiler: auto compiles nothing, no error
        ("auto", "cpu", False, True, False, "off"),  # nothing of zhtune's to compile
        ("auto", "cuda", True, True, True, "off"),  # not measured on a GPU: eager there
        (False, "cpu", True, True, True, "off"),
        (True, "cpu", True, True, False, "blocks"),
        ("blocks", "cuda", True, False, False, "blocks"),
        ("kernels", "cpu", True, True, True, "kernels"),
    ],
)
def test_the_compile_setting_resolves_per_device(monkeypatch, setting, device, fused, cxx, long_run, want):
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: "/usr/bin/g++" if cxx else None)
    assert compile_mode(setting, device, fused, long_run) == want


def test_auto_compiles_the_blocks_only_for_runs_long_enough_to_repay_it():
    assert not blocks_repay(135_000_000, 2048, 30)  # bench/train_real.py's 30-step SmolLM2 epoch
    assert blocks_repay(135_000_000, 2048, 450)  # three epochs of 1,000 records
    assert not blocks_repay(4_200_000, 4096, 300)  # a 4M-parameter model: its steps are too cheap


def test_compiling_what_cannot_be_compiled_is_refused(monkeypatch):
    with pytest.raises(ZhtuneError, match="config key 'compile'.*fused_kernels is false"):
        compile_mode("kernels", "cpu", False)
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    for setting in (True, "blocks", "kernels"):
        with pytest.raises(ZhtuneError, match="C\\+\\+ compiler"):
            compile_mode(setting, "cpu", True)


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86's probe")
def test_inductors_vector_isa_probe_runs_once_per_machine(monkeypatch, tmp_path):
    """The first run probes (Inductor's own probe) and records that every listed set passed; a
    later run trusts the record without probing; a set that fails the probe keeps it on."""
    from torch._inductor import config, cpu_vec_isa

    monkeypatch.setenv("ZHTUNE_CACHE", str(tmp_path))
    cpu = cpu_vec_isa.x86_isa_checker()
    listed = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in cpu for f in str(isa).split())]
    if not listed:
        pytest.skip("this CPU lists no vector instruction set Inductor knows")
    probes = []
    with config.patch({"cpp.vec_isa_ok": None}):
        monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: probes.append(1) or listed[1:])
        assert not compile_mod.trust_probed_vec_isa()  # the first set failed: probe on, nothing recorded
        assert config.cpp.vec_isa_ok is None and not (tmp_path / "inductor").exists()
        monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: probes.append(1) or list(listed))
        assert compile_mod.trust_probed_vec_isa() and config.cpp.vec_isa_ok is True
    [marker] = (tmp_path / "inductor").iterdir()
    assert json.loads(marker.read_text())["sets"] == [str(isa) for isa in listed]
    with config.patch({"cpp.vec_isa_ok": None}):  # a later process
        assert compile_mod.trust_probed_vec_isa() and config.cpp.vec_isa_ok is True
    assert len(probes) == 2  # no probe the third time
    monkeypatch.setenv("ZHTUNE_CACHE", "/proc/zhtune-cannot-write-here")
    with config.patch({"cpp.vec_isa_ok": None}):  # an unwritable cache: this run trusts its own probe
        assert compile_mod.trust_probed_vec_isa() and config.cpp.vec_isa_ok is True
    assert len(probes) == 3


def test_fixed_length_batches_have_one_shape_and_empty_rows_carry_nothing():
    examples = [
        {"input_ids": [5] * n, "labels": [7] * n, "position_ids": list(range(n))}
        for n in (30, 50, 20, 64, 10)
    ]
    stream = micro_batches(examples, 2, seed=0, pad_id=0, start_epoch=0, start_batch=0, fixed_length=64)
    batches = [next(stream)[2] for _ in range(6)]  # two epochs of 3 batches, each ending short
    assert {tuple(b["input_ids"].shape) for b in batches} == {(2, 64)}
    short = [b for b in batches if int(b["attention_mask"][1].sum()) == 0]
    assert len(short) == 2  # one per epoch: its second row is padding only
    for b in short:
        assert (b["labels"][1] == -100).all() and (b["input_ids"][1] == 0).all()
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 2 * (30 + 50 + 20 + 64 + 10)


@pytest.mark.parametrize("method, precision", [("lora", "fp32"), ("full", "bf16")])
def test_compiled_training_follows_the_eager_curve(method, precision, tmp_path, tiny_model_dir, train_file, capsys):
    """Compiled decoder blocks log the eager run's losses and grad norms: LoRA in fp32, and full
    fine-tuning in bf16, where zhtune's MLP, trained-linear and norm kernels run inside them."""

    def curve(name, **kw):
        run = train(
            cfg(
                tiny_model_dir,
                train_file,
                tmp_path / name,
                method=method,
                precision=precision,
                packing=True,
                cutoff_len=256,
                batch_size=2,
                max_steps=6,
                logging_steps=1,
                val_size=8,
                eval_steps=3,
                **kw,
            ),
            progress=False,
        )
        rows = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
        evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
        return [r["loss"] for r in rows], [r["grad_norm"] for r in rows], evals

    import torch._dynamo

    eager = curve("eager", compile=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = curve("compiled", compile=True)
    assert "compiling 2 decoder blocks" in capsys.readouterr().out
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 2  # the blocks ran compiled, and no other break
    # than after attention, where transformers' output-recording hook reads a ContextVar (and in
    # bf16 at zhtune's CPU attention, which runs outside the graph: torch.compiler.disable)
    allowed = ("ContextVar", "torch.compiler.disable")
    assert all(any(a in reason for a in allowed) for reason in counters["graph_break"]), dict(counters["graph_break"])
    rel = 1e-4 if precision == "fp32" else 2e-3  # (bf16: Inductor rounds its fused ops its own way)
    assert compiled[0] == pytest.approx(eager[0], rel=rel)
    assert compiled[1] == pytest.approx(eager[1], rel=10 * rel)
    assert len(compiled[2]) == 2 and compiled[2] == pytest.approx(eager[2], rel=rel)  # evaluated eagerly


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type", ["llama", "qwen2", "qwen3", "mistral", "gemma", "bloom", "gpt_neox", "glm4"]
)
def test_every_family_trains_compiled_to_the_eager_losses(model_type, tmp_path, tiny_tokenizer, train_file):
    """Slow (a fresh compilation per family): each tiny family, packed where it packs, default
    LoRA targets, fp32 -- compiled and eager runs log the same losses."""
    from zhtune.models.families import FAMILIES

    base = tmp_path / "base"
    build_tiny_model(model_type, tiny_tokenizer, seed=0).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    runs = []
    for name, compiled in (("eager", False), ("compiled", True)):
        run = train(
            cfg(base, train_file, tmp_path / name, method="lora", lora_target=["default"], template="auto",
                packing=FAMILIES[model_type].packs, cutoff_len=128, batch_size=4, max_steps=3,
                logging_steps=1, compile=compiled),
            progress=False,
        )  # fmt: skip
        runs.append(
            [json.loads(line)["loss"] for line in (run / "trainer_log.jsonl").read_text().splitlines()]
        )
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


def test_rows_marked_dynamic_compile_once_for_batches_of_any_row_count():
    """``padding_free`` batches vary in rows: marked dynamic up front, a compiled block compiles
    once for 2, 3 and 4 rows (left to Dynamo: twice), and tensors nested in tuples (the rotary
    embedding's cos and sin) with the same row count are marked too."""
    import torch
    import torch._dynamo.testing

    def block(hidden, position_embeddings, scale):
        cos, sin = position_embeddings
        return hidden * cos + sin * scale

    def compiles(wrap) -> int:
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        fn = torch.compile(block, backend=counter)
        fn = wrap(fn)
        for rows in (2, 3, 4):
            h, c = torch.randn(rows, 5, 8), torch.randn(rows, 5, 8)
            torch.testing.assert_close(fn(h, (c, c), 2.0), block(h, (c, c), 2.0))
        return counter.frame_count

    assert compiles(compile_mod._rows_dynamic) == 1
    assert compiles(lambda fn: fn) == 2


@pytest.mark.slow
def test_padding_free_training_compiled_in_blocks_follows_the_eager_curve(tmp_path, tiny_model_dir, skill_records):
    """Unpacked batches of mixed lengths, packed into fewer rows (``padding_free``), through
    compiled blocks with rows marked dynamic: the eager run's losses (LoRA, fp32)."""
    data = mixed_length_data(tmp_path, skill_records)
    runs = [
        train(
            cfg(tiny_model_dir, data, tmp_path / str(setting), method="lora", batch_size=4, max_steps=5,
                logging_steps=1, compile=setting),
            progress=False,
        )
        for setting in (False, "blocks")
    ]  # fmt: skip
    curves = [losses(run) for run in runs]
    assert len(curves[0]) == 5 and curves[1] == pytest.approx(curves[0], rel=1e-4)
