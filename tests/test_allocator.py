"""keep_freed_memory: a tensor allocated again after being freed costs no page faults;
use_huge_pages: the process runs again with malloc on transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zhtune.allocator import (
    HUGE_PAGES_TUNABLE,
    glibc_version,
    huge_pages_environment,
    keep_freed_memory,
    thp_mode,
)

CHURN = """
import resource, sys, torch
from zhtune.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(10):  # a training step's pattern: the same activations, allocated and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # 8-40 MB each and one of 113 MB (SmolLM2's fp32 output-layer gradient), 237 MB in all
    held = [torch.ones(n << 20) for n in (2, 3, 8, 8, 10)] + [torch.ones(49152, 576)]
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""
PAGES = ((124 << 20) + 49152 * 576 * 4) // 4096


def faults_of_last_round(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_tensor_memory_is_reused_without_page_faults():
    default = faults_of_last_round("default")
    if default < PAGES // 2:
        pytest.skip(f"this allocator already keeps freed memory ({default} faults)")
    assert faults_of_last_round("keep") < PAGES // 100


def test_idempotent():
    first = keep_freed_memory()
    assert keep_freed_memory() == first


RERUN = """
import os
from zhtune.allocator import use_huge_pages
print("start", os.getpid(), flush=True)
use_huge_pages()
block = bytearray(64 << 20)  # a malloc'd block, touched page by page
for i in range(0, len(block), 4096):
    block[i] = 1
huge = next(line.split()[1] for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
print("ran", os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), huge, flush=True)
"""


def test_use_huge_pages_runs_the_process_again_on_huge_pages():
    """The same process (PID) starts over once, with the tunable set, and its malloc'd memory then
    sits in huge pages; started again with the tunable already there, it goes straight on."""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ZHTUNE_HUGE_PAGES")}
    if huge_pages_environment(base, glibc_version(), thp_mode()) is None:
        pytest.skip(f"no transparent huge pages for malloc here (glibc {glibc_version()}, THP {thp_mode()})")
    def run(env: dict[str, str]) -> list[list[str]]:
        done = subprocess.run([sys.executable, "-c", RERUN], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return [line.split() for line in done.stdout.splitlines()]

    lines = run(base)
    assert [line[0] for line in lines] == ["start", "start", "ran"]  # printed before the exec and after it
    assert lines[0][1] == lines[1][1] == lines[2][1]  # one process throughout
    assert lines[2][2] == f"{HUGE_PAGES_TUNABLE}=1" and int(lines[2][3]) > 0
    lines = run({**base, "ZHTUNE_HUGE_PAGES": "0"})
    assert [line[0] for line in lines] == ["start", "ran"] and lines[1][2] == "-"


@pytest.mark.parametrize(
    ("environ", "glibc", "mode", "tunables"),
    [
        ({}, (2, 36), "madvise", f"{HUGE_PAGES_TUNABLE}=1"),
        ({}, (2, 35), "always", f"{HUGE_PAGES_TUNABLE}=1"),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise", f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}=1"),
        ({"GLIBC_TUNABLES": f"{HUGE_PAGES_TUNABLE}=0"}, (2, 36), "madvise", None),  # the user's own setting
        ({"ZHTUNE_HUGE_PAGES": "0"}, (2, 36), "madvise", None),
        ({}, (2, 34), "madvise", None),  # (no such tunable before 2.35)
        ({}, (), "madvise", None),  # not glibc
        ({}, (2, 36), "never", None),
    ],
)
def test_huge_pages_environment(environ, glibc, mode, tunables):
    env = huge_pages_environment(environ, glibc, mode)
    assert (env if env is None else env["GLIBC_TUNABLES"]) == tunables


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert thp_mode(tmp_path / "enabled") == "madvise"
    assert thp_mode(tmp_path / "missing") == "never"
