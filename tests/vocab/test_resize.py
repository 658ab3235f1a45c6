"""``zhtune vocab resize`` and training the new rows: old logits unchanged, new rows the mean of
their pieces, loss on old-token text nearly unchanged, and stage pt with method embeddings (or
LoRA with modules_to_save) lowers the loss on Chinese text."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.vocab.helpers import EN, english_lines, heldout_lines, write_text_records, zh_lines
from zhtune.cli import main
from zhtune.config import build_config
from zhtune.models.loading import load_for_inference
from zhtune.models.tiny import build_tiny_llama
from zhtune.train.config import TrainConfig
from zhtune.train.sft import train


def pretrain_english(model, tokenizer, steps: int = 80, seed: int = 0):
    """A few steps on English so the model is no longer uniform (a random model gives every token,
    new or old, the same small probability: no test of initialisation at all)."""
    torch.manual_seed(seed)
    ids = tokenizer.encode("\n".join(english_lines()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,)).tolist()
        x = torch.tensor([ids[s : s + 64] for s in starts])
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, byte_base, byte_extended):
    """``models("tied" | "untied")`` -> (base model dir, resized model dir), each built once: a tiny
    LLaMA on the byte-level base tokenizer, briefly trained on English, resized with the CLI."""
    built: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in built:
            tokenizer = AutoTokenizer.from_pretrained(byte_base)
            model = build_tiny_llama(
                tokenizer, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128
            )
            if kind == "untied":
                model.config.tie_word_embeddings = False
                model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
            pretrain_english(model, tokenizer)
            base = tmp_path_factory.mktemp(f"model-{kind}")
            model.save_pretrained(base)
            tokenizer.save_pretrained(base)
            resized = tmp_path_factory.mktemp("resized") / "model"
            assert main(["vocab", "resize", str(base), str(byte_extended[0]), "-o", str(resized)]) == 0
            built[kind] = base, resized
        return built[kind]

    return get


def token_loss(model, tokenizer, lines: list[str]) -> float:
    """Mean next-token loss over ``lines`` (each its own sequence)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([tokenizer.encode(line, add_special_tokens=False)])
            if ids.shape[1] > 1:
                total += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
    return total / count


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_resize_keeps_old_logits_and_inits_new_rows_from_pieces(kind, models, byte_extended):
    base_model, resized = models(kind)
    old = AutoModelForCausalLM.from_pretrained(base_model).eval()
    new = AutoModelForCausalLM.from_pretrained(resized).eval()
    old_tok, new_tok = AutoTokenizer.from_pretrained(base_model), AutoTokenizer.from_pretrained(resized)
    assert new_tok.get_vocab() == AutoTokenizer.from_pretrained(byte_extended[0]).get_vocab()
    rows = new.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(new_tok) > len(old_tok) and new.config.vocab_size == rows
    tied = new.get_output_embeddings().weight is new.get_input_embeddings().weight
    assert tied == (kind == "tied") == old.config.tie_word_embeddings

    # old-token input: exactly the same logits in the old vocabulary's columns
    ids = torch.tensor([old_tok.encode(EN.read_text(encoding="utf-8"))[:128]])
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits[..., : len(old_tok)], old(ids).logits, rtol=0, atol=1e-6)

    # a new word's rows are the mean of the rows of its pieces under the old tokenizer
    word = "人工智能"
    (new_id,) = new_tok.encode(word, add_special_tokens=False)
    pieces = old_tok.encode(word, add_special_tokens=False)
    assert len(pieces) > 1
    for a, b in [(new.get_input_embeddings(), old.get_input_embeddings())] + (
        [] if tied else [(new.get_output_embeddings(), old.get_output_embeddings())]
    ):
        torch.testing.assert_close(a.weight[new_id], b.weight[pieces].mean(0))


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_mean_init_barely_changes_the_loss_on_old_tokens(kind, models):
    """The new columns add to the softmax; initialised from pieces the model finds unlikely in
    English, they add little: less than HF's mean-of-all-rows sampling, far less than random rows."""
    base_model, resized = models(kind)
    old = AutoModelForCausalLM.from_pretrained(base_model).eval()
    new = AutoModelForCausalLM.from_pretrained(resized).eval()
    tok = AutoTokenizer.from_pretrained(base_model)
    lines = EN.read_text(encoding="utf-8").splitlines()
    before, after = token_loss(old, tok, lines), token_loss(new, tok, lines)
    rows = new.get_input_embeddings().weight.shape[0]
    torch.manual_seed(0)
    sampled = AutoModelForCausalLM.from_pretrained(base_model).eval()
    sampled.resize_token_embeddings(rows, mean_resizing=True)
    print(
        f"English loss {before:.4f} -> {after:.4f} (HF mean_resizing: {token_loss(sampled, tok, lines):.4f})"
    )
    assert abs(after - before) < 0.05
    assert after - before < token_loss(sampled, tok, lines) - before


def test_embeddings_method_learns_chinese(models, tmp_path):
    """stage pt, method embeddings: a few steps lower the loss on held-out Chinese lines, and only
    the (tied) embedding weights change."""
    _, resized = models("tied")
    held = set(heldout_lines())
    data = write_text_records(tmp_path / "zh.jsonl", [t for t in zh_lines() if t not in held] * 4)
    cfg = build_config(
        TrainConfig,
        dict(
            model=str(resized), data=[str(data)], output_dir=str(tmp_path / "run"), stage="pt",
            method="embeddings", template="chatml", max_steps=30, batch_size=8, lr=1e-2, cutoff_len=64,
            logging_steps=10,
        ),
    )  # fmt: skip
    run = train(cfg, progress=False)
    tok = AutoTokenizer.from_pretrained(resized)
    before = token_loss(AutoModelForCausalLM.from_pretrained(resized).eval(), tok, sorted(held))
    after = token_loss(AutoModelForCausalLM.from_pretrained(run / "model").eval(), tok, sorted(held))
    print(f"held-out Chinese loss {before:.3f} -> {after:.3f}")
    assert after < 0.9 * before
    a, b = load_file(resized / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all("embed_tokens" in k or "lm_head" in k for k in changed), changed


def test_lora_with_modules_to_save_learns_chinese(models, tmp_path):
    """Chinese-LLaMA's recipe (untied head, as LLaMA's): LoRA plus fully trained embeddings and
    head, saved with the adapter."""
    _, resized = models("untied")
    held = set(heldout_lines())
    data = write_text_records(tmp_path / "zh.jsonl", [t for t in zh_lines() if t not in held] * 4)
    cfg = build_config(
        TrainConfig,
        dict(
            model=str(resized), data=[str(data)], output_dir=str(tmp_path / "run"), stage="pt", method="lora",
            modules_to_save=["embed_tokens", "lm_head"], template="chatml", max_steps=30, batch_size=8,
            lr=1e-2, cutoff_len=64, logging_steps=10,
        ),
    )  # fmt: skip
    run = train(cfg, progress=False)
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any("embed_tokens" in k for k in saved) and any("lora_A" in k for k in saved)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) == {"embed_tokens", "lm_head"}
    model, tok, _ = load_for_inference(run)
    before = token_loss(AutoModelForCausalLM.from_pretrained(resized).eval(), tok, sorted(held))
    after = token_loss(model, tok, sorted(held))
    print(f"held-out Chinese loss {before:.3f} -> {after:.3f}")
    assert after < 0.9 * before


def test_modules_to_save_needs_a_lora_method(tmp_path):
    from zhtune.errors import ZhtuneError

    with pytest.raises(ZhtuneError, match="modules_to_save.*method embeddings does not take it"):
        build_config(
            TrainConfig,
            dict(model="m", data=["x.jsonl"], output_dir=str(tmp_path), method="embeddings",
                 modules_to_save=["lm_head"]),
        )  # fmt: skip


def test_resize_errors(tmp_path, capsys, models, byte_extended, sp_base):
    base_model, _ = models("tied")

    def run(*args: str) -> str:
        assert main(["vocab", "resize", *args]) == 1
        return capsys.readouterr().err

    out = str(tmp_path / "o")
    assert "model path not found" in run(str(tmp_path / "nope"), str(byte_extended[0]), "-o", out)
    assert "new tokenizer directory not found" in run(str(base_model), str(tmp_path / "nope"), "-o", out)
    assert "not an extension of the model's" in run(str(base_model), str(sp_base), "-o", out)
    assert "nothing to resize" in run(str(base_model), str(base_model), "-o", out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not an empty directory" in run(
        str(base_model), str(byte_extended[0]), "-o", str(tmp_path / "full")
    )
