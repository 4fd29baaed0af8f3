"""Throughput of public KV-cache quantizer packages, for side-by-side rows in bench_codecs.py.

Runs in a SEPARATE throwaway environment — these packages are never kvtool dependencies::

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch==2.13.0 polarquant==0.6.0 tiny-turboquant==0.18.0
    .venv/bin/python benchmarks/bench_codecs.py --public-python /tmp/benchvenv/bin/python

Same protocol as bench_codecs.py (1M vectors, d = 64, float32 standard normal with seed 0, 2 threads,
median of 3). Only the packages' own quantizer entry points are called:

* ``polarquant`` 0.6.0: ``polarengine_vllm.kv_cache.cache.PolarKVQuantizer(64, nbits)``, ``quantize`` /
  ``dequantize`` (Hadamard rotation + Lloyd-Max codes, bit-packed, bf16 norm: ``b + 0.25`` bits).
* ``tiny-turboquant`` 0.18.0, its KIVI path: ``AffineBlockQuantizer.quantize_block`` on keys per channel in
  blocks of 128 tokens and on values per token, then the package's ``_pack``; decoding is ``_unpack``
  followed by ``idx * scale + zero`` as ``TinyKVCache._materialize_full`` does it.

Prints one JSON line per row: ``{"name", "bits", "enc", "dec"}`` (seconds).
"""

from __future__ import annotations

import os

THREADS = 2
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HEADS, DIM, BLOCK = 8, 64, 128


def median_seconds(fn, repeats: int = 3):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def polarquant_rows(x: torch.Tensor) -> list[dict]:
    from polarengine_vllm.kv_cache.cache import PolarKVQuantizer

    rows = []
    for bits in (3, 4):
        q = PolarKVQuantizer(DIM, nbits=bits, device="cpu")
        t_enc, (packed, norms) = median_seconds(lambda q=q: q.quantize(x))
        t_dec, _ = median_seconds(lambda q=q, p=packed, n=norms: q.dequantize(p, n, x.shape))
        stored = packed.numel() * packed.element_size() + norms.numel() * norms.element_size()
        rows.append({"name": f"polarquant 0.6.0 PolarKVQuantizer nbits={bits}",
                     "bits": 8 * stored / x.numel(), "enc": t_enc, "dec": t_dec})
    return rows


def tiny_turboquant_rows(x: torch.Tensor) -> list[dict]:
    from tiny_turboquant.affine import AffineBlockQuantizer
    from tiny_turboquant.cache import _pack, _pack_mode, _unpack

    heads, tokens, dim = x.shape
    rows = []
    for bits in (4, 2):
        quantizer, mode = AffineBlockQuantizer(bits), _pack_mode(bits, dim)
        blocks = x.view(heads, tokens // BLOCK, BLOCK, dim)  # keys: per channel within 128-token blocks
        for role, data, axis in (("keys", blocks, "channel"), ("values", x, "token")):

            def encode(data=data, axis=axis, quantizer=quantizer, mode=mode):
                idx, scale, zero = quantizer.quantize_block(data, axis=axis)
                return _pack(idx, mode), scale.half(), zero.half()

            def decode(enc, mode=mode):
                packed, scale, zero = enc
                return (_unpack(packed, mode, dim).float() * scale.float() + zero.float()).half()

            t_enc, enc = median_seconds(encode)
            t_dec, _ = median_seconds(lambda enc=enc: decode(enc))
            stored = sum(t.numel() * t.element_size() for t in enc)
            rows.append({"name": f"tiny-turboquant 0.18.0 KIVI {role} bits={bits}",
                         "bits": 8 * stored / x.numel(), "enc": t_enc, "dec": t_dec})
    return rows


def main() -> None:
    vectors = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20
    torch.set_num_threads(THREADS)
    x = np.random.default_rng(0).standard_normal((HEADS, vectors // HEADS, DIM)).astype(np.float32)
    t = torch.from_numpy(x)
    for rows in (polarquant_rows, tiny_turboquant_rows):
        try:
            for row in rows(t):
                print(json.dumps(row), flush=True)
        except ImportError as exc:
            print(json.dumps({"error": f"{rows.__name__}: {exc}"}), flush=True)


if __name__ == "__main__":
    main()
