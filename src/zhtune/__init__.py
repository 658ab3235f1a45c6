"""zhtune: instruction-tune open LLMs for Chinese and English.

The package's folders follow the pipeline: ``data`` (read, convert, render), ``models`` (load,
build tiny ones), ``train`` (the SFT loop), ``infer`` (generation, chat), ``eval`` (scores).
``cli.py`` is a thin shell over them; heavy libraries are imported lazily inside commands.
"""

__version__ = "0.1.0"
