"""The run directory: the one module that names its files and reads them back.

``zhtune train`` writes a run, everything else (chat, predict, serve, export, eval, the web UI,
experiments) reads one; they all go through :class:`RunDir`, so the layout lives here alone::

    RUN/
      config.yaml          the resolved training config
      model/ | adapter/    the weights (a finished run has one of them)
      trainer_log.jsonl    one JSON row per logged step (the last may be half-written while training)
      trainer_state.json   inside checkpoints/step-N/: where the loop stood
      train_results.json   the summary, written when training finished
      loss.png, rejects.jsonl, truncated.jsonl, checkpoints/step-N/, eval/
      tracking/            TensorBoard events (report_to)
      gguf/                GGUF files made for ``--engine llamacpp`` (``RUN-TYPE.gguf``), a cache
    EXPORT/zhtune_export.json   the manifest of a ``zhtune export`` directory
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
LOG = "trainer_log.jsonl"
STATE = "trainer_state.json"
RESULTS = "train_results.json"
LOSS_PLOT = "loss.png"
REJECTS = "rejects.jsonl"
TRUNCATED = "truncated.jsonl"
CHECKPOINTS = "checkpoints"
MODEL = "model"
ADAPTER = "adapter"
EVAL = "eval"
TRACKING = "tracking"
"""Where ``report_to`` trackers that write files (TensorBoard) put them: ``RUN/tracking/RUN_NAME/``."""
GGUF = "gguf"
"""Where ``serve`` / ``predict --engine llamacpp`` keep the GGUF files they exported from a run."""
EXPORT_MANIFEST = "zhtune_export.json"
"""What ``zhtune export`` writes beside the weights: source run, method, template, dtype,
quantization, and an adapter kept apart (``adapter/``) if it was not merged."""


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file that a writer may still be appending to: blank lines and a
    half-written last line are skipped; [] if the file does not exist."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


@dataclass(frozen=True)
class RunDir:
    """A run directory's paths and readers (nothing is created by building one)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    # -- paths ----------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL

    def gguf_file(self, gguf_type: str) -> Path:
        """``gguf/RUN-TYPE.gguf``: the run exported for llama.cpp (a cache; made on first use)."""
        return self.path / GGUF / f"{self.path.resolve().name}-{gguf_type}.gguf"

    def weights_mtime(self) -> float:
        """When the run's weights (``model/`` or ``adapter/``) last changed: a cached GGUF older
        than this is stale."""
        files = [f for d in (self.model_dir, self.adapter_dir) if d.is_dir() for f in d.iterdir()]
        return max((f.stat().st_mtime for f in files), default=0.0)

    def checkpoint(self, step: int) -> Path:
        """``checkpoints/step-N``."""
        return self.checkpoints_dir / f"step-{step}"

    # -- state ----------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """Training finished: ``config.yaml`` and ``model/`` or ``adapter/``."""
        return self.config_path.is_file() and (self.model_dir.is_dir() or self.adapter_dir.is_dir())

    @property
    def is_run(self) -> bool:
        """A run, finished or still training: ``config.yaml`` plus a log or weights."""
        return self.config_path.is_file() and (
            self.log_path.exists() or self.model_dir.is_dir() or self.adapter_dir.is_dir()
        )

    @property
    def is_export(self) -> bool:
        """A ``zhtune export`` directory."""
        return (self.path / EXPORT_MANIFEST).is_file()

    # -- readers --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """``config.yaml`` as a dict ({} if empty)."""
        import yaml

        return yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}

    def log(self) -> list[dict[str, Any]]:
        """Rows of ``trainer_log.jsonl`` (a half-written last line is skipped)."""
        return read_jsonl_rows(self.log_path)

    def results(self) -> dict[str, Any] | None:
        """``train_results.json``, or None while training (or after an interruption)."""
        if not self.results_path.is_file():
            return None
        return json.loads(self.results_path.read_text(encoding="utf-8"))

    def export_manifest(self) -> dict[str, Any]:
        """``zhtune_export.json`` of an export directory."""
        return json.loads((self.path / EXPORT_MANIFEST).read_text(encoding="utf-8"))

    def latest_checkpoint(self) -> Path | None:
        """The newest ``checkpoints/step-N`` that finished writing (it holds its state file), or None."""
        done = [p for p in self.checkpoints_dir.glob("step-*") if (p / STATE).exists()]
        return max(done, key=checkpoint_step, default=None)

    def checkpoints(self) -> list[Path]:
        """Every ``checkpoints/step-N``, oldest first."""
        return sorted(self.checkpoints_dir.glob("step-*"), key=checkpoint_step)

    def last_change(self) -> float:
        """When the run last wrote its log (or its config): for newest-first listings."""
        return (self.log_path if self.log_path.exists() else self.config_path).stat().st_mtime


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed into place, so a reader (or a crash) never
    sees half a report."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def checkpoint_run(path: str | Path) -> Path | None:
    """The run directory that ``path`` is a ``checkpoints/step-N`` of (it holds its state file), or None."""
    p = Path(path)
    if p.parent.name == CHECKPOINTS and p.name.startswith("step-") and (p / STATE).is_file():
        return p.parent.parent
    return None


def checkpoint_problem(path: Path) -> str:
    """Why checkpoint ``path`` cannot be complete, naming the file ("" when it looks whole): its
    state file must parse, no file may be empty, and each safetensors file must hold the bytes its
    header promises (a write cut short by a crash or a full disk fails here, before loading)."""
    state = path / STATE
    if not state.is_file():
        return f"{state} is missing"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{state} does not parse ({err})"
    files = sorted(f for f in path.rglob("*") if f.is_file())
    if not any(f.is_dir() for f in path.iterdir()):  # one process or DDP: accelerate's flat layout
        names = {f.name for f in files}
        if not names & set(CHECKPOINT_WEIGHTS):
            return f"{path} holds no weights file ({' or '.join(CHECKPOINT_WEIGHTS)})"
        for name in CHECKPOINT_STATE:
            if name not in names:
                return f"{path / name} is missing"
    for f in files:
        size = f.stat().st_size
        if size == 0:
            return f"{f} is empty"
        problem = _safetensors_problem(f, size) if f.suffix == ".safetensors" else ""
        problem = problem or (_torch_file_problem(f, size) if f.suffix in (".bin", ".pkl") else "")
        if problem:
            return f"{f} {problem}"
    return ""


CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
"""A flat checkpoint's weights: accelerate's save of the model, or a peft adapter's."""
CHECKPOINT_STATE = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")
"""accelerate's training state in a flat checkpoint (accelerate would skip a bad RNG file silently)."""
CRC_CHECKED_BYTES = 2**30
"""torch files up to this size have every member's CRC checked (larger: the archive index only)."""


def _torch_file_problem(path: Path, size: int) -> str:
    """A ``torch.save`` file is a zip archive: check it without unpickling anything."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return "is not a readable torch file (truncated or overwritten)"
    if size <= CRC_CHECKED_BYTES:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"is corrupt ({err})"
        if bad is not None:
            return f"is corrupt (its member {bad} fails its checksum)"
    return ""


def _safetensors_problem(path: Path, size: int) -> str:
    """A safetensors file: 8 bytes of header length, a JSON header, then the tensors' bytes."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes)"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"is truncated: its header alone needs {8 + n} bytes, the file has {size}"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "has an unreadable header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"is truncated: {size} of {expected} bytes"
    return ""


def checkpoint_step(path: Path) -> int:
    """N of a ``step-N`` checkpoint directory."""
    return int(path.name.split("-")[1])


def eval_dir(run: str | Path) -> Path:
    """``RUN/eval`` for a run (or model) directory; an eval directory itself is returned as is."""
    run = Path(run)
    if run.name == EVAL and not (run / EVAL).is_dir():
        return run
    return run / EVAL
