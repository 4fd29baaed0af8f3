"""GPU check of kvtool's runtime (no GPU on the development machine): run on a machine with CUDA.

1. Device codecs on the GPU against the numpy references (real captured layers of the bundled sample): the
   share of identical stored bytes per spec (a GPU matmul may round a rotated coordinate across a codebook
   boundary now and then, so a few codes may differ) and the decode error against the reference.
2. That coding stays on the GPU: every array of a device Encoded is a CUDA tensor.
3. The bundled model on the GPU (bfloat16): greedy ``generate()`` with a compact CodecCache gives the decoded
   cache's tokens, attention from codes runs, and the held bytes (walked from outside) per device.

Run: ``python benchmarks/gpu_check.py`` (exit 1 when a check fails).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

SPECS = ["turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true", "turboquant:bits=3", "kivi:bits=2",
         "uniform:bits=4", "fp8", "h2o:keep=0.5+turboquant:bits=3"]


def main() -> int:
    from pathlib import Path

    from kvtool.cache import CodecCache
    from kvtool.codecs import LayerContext, parse_spec
    from kvtool.compat import generate_cache_kwarg
    from kvtool.hooks import restore_attention
    from kvtool.models import load_model
    from kvtool.runtime.backends import device_codec
    from kvtool.runtime.device import to_numpy
    from kvtool.runtime.memory import held_bytes
    from kvtool.store import CacheReader

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    dev = torch.device("cuda")
    root = Path(__file__).resolve().parents[1]
    failed = False
    with CacheReader(root / "samples" / "smollm2-apache-256.h5") as r:
        layers = [r.layer(i) for i in (0, 15, 29)]
    for spec in SPECS:
        same = total = 0
        err = 0.0
        for d in layers:
            for role in ("keys", "values"):
                x = getattr(d, role)
                ctx = LayerContext(layer=d.layer, role=role, keys=d.keys, values=d.values, queries=d.queries,
                                   query_positions=d.query_positions, key_positions=np.arange(x.shape[1]),
                                   scaling=d.scaling)
                ref = parse_spec(spec).for_role(role)
                ref.fit(x, ctx)
                want = ref.encode(x)
                coder = device_codec(parse_spec(spec).for_role(role))
                coder.fit(torch.from_numpy(x).to(dev), np.arange(x.shape[1]), lambda ctx=ctx: ctx)
                got = coder.encode(torch.from_numpy(x).to(dev))
                if not all(v.is_cuda for v in got.arrays.values()):
                    print(f"FAIL {spec}: an array left the GPU")
                    failed = True
                host = to_numpy(got)
                for k, v in want.arrays.items():
                    a, b = host.arrays[k].view(np.uint8).ravel(), v.view(np.uint8).ravel()
                    same += int((a == b).sum()) if a.shape == b.shape else 0
                    total += b.size
                ref_x = ref.decode(want)
                err = max(err, float(np.abs(coder.decode(got).cpu().numpy() - ref_x).max() / np.abs(ref_x).max()))
        print(f"{spec}: identical stored bytes {same / total:.5f}, max decode difference {err:.2e} (of max |x|)")
        failed |= same / total < 0.999 or err > 1e-2
    loaded = load_model("default", device="cuda", dtype="bfloat16")
    model, tok = loaded.model, loaded.tokenizer
    ids = tok((root / "samples" / "gpl-3.0.txt").read_text(), return_tensors="pt").input_ids[:, :2048].to(dev)
    for spec in SPECS[:3] + SPECS[5:]:
        outs = {}
        for label, kw in (("decoded", {}), ("compact", {"compact": True}),
                          ("codes", {"compact": True, "attention": "codes"})):
            cache = CodecCache(model, spec, **kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                outs[label] = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                             **{generate_cache_kwarg(): cache})
            torch.cuda.synchronize()
            print(f"  {spec} {label}: {time.perf_counter() - t0:.2f} s, held {held_bytes(cache, by_device=True)}, "
                  f"stored {cache.stored_bytes()}")
            restore_attention(model)
        same = torch.equal(outs["decoded"], outs["compact"])
        agree = float((outs["codes"] == outs["decoded"]).float().mean())
        print(f"{spec}: compact tokens identical {same}; attention from codes agrees on {agree:.3f} of tokens")
        failed |= not same
    print("FAILED" if failed else "OK")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
