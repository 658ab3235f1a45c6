"""Chinese vocabulary expansion: add Chinese words to a base tokenizer, then resize a model for it.

Three steps, as in Chinese-LLaMA and BELLE's LLaMA-EXT:

1. ``zhtune vocab extend`` (:mod:`~zhtune.vocab.extend`): train a Chinese vocabulary on a corpus and
   merge the pieces the base lacks into it (:mod:`~zhtune.vocab.merge`), keeping every existing
   id and special token, and measure tokens per character before and after;
2. ``zhtune vocab resize`` (:mod:`~zhtune.vocab.resize`): grow a model's embeddings and LM head
   to the new vocabulary, each new row the mean of the rows of its old-tokenizer pieces;
3. ``zhtune train stage=pt method=embeddings`` (or LoRA with ``modules_to_save``): learn the new
   rows on Chinese text.
"""
