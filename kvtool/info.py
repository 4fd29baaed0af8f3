"""What a kvtool file holds, as a JSON-ready dict (the data behind ``kvtool inspect``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtool.store import KEYS, QUERIES, SCHEMA_VERSION, VALUES, CacheReader, checksum_coverage, reading


def _storage(obj: Any) -> tuple[int, int]:
    """(bytes on disk, elements) of a dataset, or of every dataset in a codec group."""
    import h5py

    if isinstance(obj, h5py.Dataset):
        return int(obj.id.get_storage_size()), int(obj.size)
    disk = sum(int(obj[k].id.get_storage_size()) for k in obj)
    shape = [int(s) for s in obj.attrs["shape"]]
    return disk, shape[0] * shape[1] * shape[2]


def describe(path: Path | str) -> dict[str, Any]:
    """Model, texts, per-layer shapes and bytes of a kvtool file.

    ``bytes_in_memory`` is what the tensors take uncompressed at the file's dtype (a compressed file
    counts its keys/values at 16 bits, the baseline a KV cache would hold); ``bytes_on_disk`` includes the
    4-byte checksum of each chunk. ``checksums`` says whether the datasets carry Fletcher-32.
    """
    with CacheReader(path) as reader:
        info = reader.info
        checksummed, datasets = checksum_coverage(reader)
        itemsize = 4 if info.dtype == "float32" else 2
        layers: list[dict[str, Any]] = []
        for i in range(info.num_layers):
            disk = mem = 0
            for seq in info.sequences:
                g = reader.layer_group(i, seq.index)
                with reading(info.path, f"sequence {seq.index}, layer {i}"):  # damaged metadata: one line
                    for name in (KEYS, VALUES, QUERIES):
                        if name in g:
                            d, n = _storage(g[name])
                            disk += d
                            mem += n * (2 if info.kind == "compressed" and name != QUERIES else itemsize)
            first = info.sequences[0].layers[i]
            layers.append({
                "index": i,
                "layer_type": first.layer_type,
                "sliding_window": first.sliding_window,
                "num_tokens": [s.layers[i].num_tokens for s in info.sequences],
                "num_queries": [s.layers[i].num_queries for s in info.sequences],
                "bytes_on_disk": disk,
                "bytes_in_memory": mem,
            })
    attrs = info.attrs
    return {
        "path": str(info.path),
        "schema": SCHEMA_VERSION,
        "kind": info.kind,
        "model": info.model,
        "model_architecture": info.model_architecture,
        "model_source": info.model_source,
        "num_layers": info.num_layers,
        "num_q_heads": info.num_q_heads,
        "num_kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "dtype": info.dtype,
        "attn_scaling": info.attn_scaling,
        "created": info.created,
        "kvtool_version": info.kvtool_version,
        "codec_keys": str(attrs.get("codec_keys", "")),
        "codec_values": str(attrs.get("codec_values", "")),
        "has_queries": info.has_queries,
        "sequences": [
            {"index": s.index, "source": s.source, "num_tokens": s.num_tokens, "text_sha256": s.text_sha256}
            for s in info.sequences
        ],
        "layers": layers,
        "total": {
            "bytes_on_disk": sum(x["bytes_on_disk"] for x in layers),
            "bytes_in_memory": sum(x["bytes_in_memory"] for x in layers),
        },
        "file_bytes": Path(path).stat().st_size,
        # "fletcher32" on every dataset, "none" (a file written before kvtool checksummed its data), or "partial"
        "checksums": "fletcher32" if checksummed == datasets else "none" if checksummed == 0 else "partial",
        "checksummed_datasets": checksummed,
        "datasets": datasets,
    }
