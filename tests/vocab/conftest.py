"""Fixtures of the vocab tests: base tokenizers and their extensions, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vocab.helpers import build_byte_level, build_sentencepiece, extend


@pytest.fixture(scope="session")
def byte_base(tmp_path_factory) -> Path:
    return build_byte_level(tmp_path_factory.mktemp("byte-base"), "zhtune")


@pytest.fixture(scope="session")
def byte_extended(tmp_path_factory, byte_base) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("byte-ext") / "tok"
    return out, extend(byte_base, out)


@pytest.fixture(scope="session")
def sp_base(tmp_path_factory) -> Path:
    return build_sentencepiece(tmp_path_factory.mktemp("sp-base"))
