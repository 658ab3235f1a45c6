"""Chinese vocabulary expansion on real data: tokens per character before and after.

    python bench/vocab_extend.py [--corpus ../shared/data/zh/carbonz0_alpaca_zh_parts00-01.json]
        [--vocab-size 20000] [--workdir /tmp/zhtune-vocab-bench]

Builds three bases locally (no download), then runs ``zhtune vocab extend BASE CORPUS`` on each
(1% of the corpus lines held out for the table, plus the English self-instruct seed tasks as
pure English text):

* ``zh4k``: the 4k byte-level BPE of ``bench/train_throughput.py``'s ``prepare()`` (trained on
  LLaMA-Factory's 1,000-record Chinese demo; every Han character its own pre-token);
* ``en-bytes``: a byte-level BPE (GPT-2 regex, 8k) trained on the English side of Alpaca-52K;
* ``en-sp``: a LLaMA-style SentencePiece BPE (8k, byte fallback) on the same English text,
  loaded by transformers' LlamaTokenizer: Chinese-LLaMA's starting point in miniature.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def english_texts(path: Path) -> list[str]:
    records = json.loads(path.read_text(encoding="utf-8"))
    return [r[k] for r in records for k in ("en_instruction", "en_input", "en_output") if r.get(k)]


def build_bases(workdir: Path) -> dict[str, Path]:
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    sys.path.insert(0, str(HERE))
    from train_throughput import prepare

    _, dirs, _ = prepare(str(SHARED / "llamafactory" / "alpaca_zh_demo.json"), workdir / "zh4k", ["ref"])
    bases = {"zh4k": dirs["ref"]}

    english = english_texts(SHARED / "zh" / "alpaca_chinese_52k_v3.json")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(english, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    bases["en-bytes"] = workdir / "en-bytes"
    fast.save_pretrained(bases["en-bytes"])

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(english), model_writer=model, vocab_size=8000, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    bases["en-sp"] = workdir / "en-sp"
    bases["en-sp"].mkdir(parents=True, exist_ok=True)
    (bases["en-sp"] / "tokenizer.model").write_bytes(model.getvalue())
    LlamaTokenizer.from_pretrained(bases["en-sp"]).save_pretrained(bases["en-sp"])
    return bases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(SHARED / "zh" / "carbonz0_alpaca_zh_parts00-01.json"))
    p.add_argument("--vocab-size", type=int, default=20000)
    p.add_argument(
        "--english", default=str(SHARED / "alpaca" / "seed_tasks.jsonl"), help="English text to measure"
    )
    p.add_argument("--workdir", default="/tmp/zhtune-vocab-bench")
    args = p.parse_args()
    workdir = Path(args.workdir)
    for name, base in build_bases(workdir).items():
        print(f"\n## {name}\n", flush=True)
        cmd = [sys.executable, "-m", "zhtune", "vocab", "extend", str(base), args.corpus, "-o", str(workdir / f"{name}-ext"),
               "--vocab-size", str(args.vocab_size), "--eval-text", args.english, "--overwrite", "--no-progress"]  # fmt: skip
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
