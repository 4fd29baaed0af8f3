"""Real caches for the integrity tests: the bundled sample (SmolLM2 over apache-2.0.txt), written again by
today's CacheWriter (so with checksums), whole or cut down; and helpers that damage files."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py

from kvtool.store import CacheReader, CacheWriter, StoreHeader

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "smollm2-apache-256.h5"


def rewrite(dst: Path, *, layers: int | None = None, repeat: int = 1, src: Path = SAMPLE) -> Path:
    """``src`` written again by CacheWriter: its first ``layers`` layers, its first sequence ``repeat`` times."""
    with CacheReader(src) as r:
        info = r.info
        n = layers or info.num_layers
        header = StoreHeader(model=info.model, model_architecture=info.model_architecture, num_layers=n,
                             num_q_heads=info.num_q_heads, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim,
                             attn_scaling=info.attn_scaling, dtype=info.dtype, model_source=info.model_source)
        with CacheWriter(dst, header) as w:
            for _ in range(repeat):
                j = w.add_sequence(r.tokens(0), source=info.sequences[0].source, text="apache-2.0 sample")
                for i in range(n):
                    d = r.layer(i)
                    w.write_layer(j, i, d.keys, d.values, queries=d.queries, query_positions=d.query_positions,
                                  keys_prerope=d.keys_prerope)
    return dst


def strip_checksums(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as kvtool wrote files before checksums: earliest HDF5 format, no filters."""
    with h5py.File(src) as a, h5py.File(dst, "w") as b:
        b.attrs.update(dict(a.attrs))

        def copy(name: str, obj) -> None:
            if isinstance(obj, h5py.Group):
                b.require_group(name).attrs.update(dict(obj.attrs))
            else:
                ds = b.create_dataset(name, data=obj[()], chunks=obj.chunks if obj.size else None)
                ds.attrs.update(dict(obj.attrs))

        a.visititems(copy)
    return dst


def chunk_offset(path: Path, dataset: str, chunk: int = 0) -> int:
    """Byte offset in the file of one chunk of ``dataset``."""
    with h5py.File(path) as f:
        return int(f[dataset].id.get_chunk_info(chunk).byte_offset)


def flip(path: Path, offset: int, count: int = 64) -> None:
    """Invert ``count`` bytes from ``offset`` (bit rot, a bad sector, a careless editor)."""
    data = bytearray(path.read_bytes())
    for k in range(offset, min(offset + count, len(data))):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def poison(path: Path, dataset: str, values: list[float]) -> None:
    """Overwrite the first elements of ``dataset`` with ``values`` through HDF5 (checksums stay valid)."""
    with h5py.File(path, "a") as f:
        x = f[dataset][()]
        flat = x.reshape(-1)
        flat[: len(values)] = values
        f[dataset][...] = x


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def all_datasets(path: Path) -> list[tuple[str, tuple | None, bool, tuple]]:
    """(name, chunks, has Fletcher-32, shape) of every dataset in the file."""
    out: list = []
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.append((n, o.chunks, o.fletcher32, o.shape))
                     if isinstance(o, h5py.Dataset) else None)
    return out

