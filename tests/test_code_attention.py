"""Attention from codes (kvtool.runtime.code_attention) equals attention over the decoded keys and values,
on real captured layers of the bundled sample (SmolLM2: 9 query heads, 3 kv heads, head_dim 64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _real_cache import SAMPLE

from kvtool.codecs import parse_spec
from kvtool.runtime.backends import device_codec
from kvtool.runtime.code_attention import DecodedBlock, GroupBlock, TurboQuantBlock, attend, block_for
from kvtool.store import CacheReader

SPECS = [
    ("turboquant:bits=3", TurboQuantBlock), ("turboquant:bits=2", TurboQuantBlock),
    ("turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true", TurboQuantBlock),
    ("turboquant:bits=4,center=true", TurboQuantBlock),
    ("kivi:bits=2", GroupBlock), ("kivi:bits=2,axis=channel,group=48,residual=20", GroupBlock),
    ("kivi:bits=4,axis=token,group=16,residual=20", GroupBlock),
    ("uniform:bits=4", GroupBlock), ("uniform:bits=3,group=16", GroupBlock),
    ("uniform:bits=2,axis=channel,group=0", GroupBlock),
    ("fp8", DecodedBlock), ("h2o:keep=0.5+turboquant:bits=3", DecodedBlock),
]
CUTS = (0, 100, 230)  # two coded blocks and a precise window of 26 tokens


@pytest.fixture(scope="module")
def layers():
    with CacheReader(SAMPLE) as r:
        return [r.layer(i) for i in (1, 28)]


def _code(spec: str, role: str, x: np.ndarray, d, start: int, stop: int):
    from kvtool.codecs import LayerContext

    coder = device_codec(parse_spec(spec).for_role(role))
    block = torch.from_numpy(x[:, start:stop])
    ctx = LayerContext(layer=d.layer, role=role, keys=d.keys[:, start:stop], values=d.values[:, start:stop],
                       queries=d.queries, query_positions=d.query_positions,
                       key_positions=np.arange(start, stop), scaling=d.scaling)
    coder.fit(block, np.arange(start, stop), lambda: ctx)
    enc = coder.encode(block)
    return coder, enc


@pytest.mark.parametrize("spec,kind", SPECS)
@pytest.mark.parametrize("skip", [0, 7])
def test_attention_from_codes_equals_attention_over_decoded_keys(layers, spec, kind, skip):
    for d in layers:
        q = torch.from_numpy(d.queries)  # (9, 32, 64) at positions 224..255
        keys, values, decoded = [], [], {"keys": [], "values": []}
        for role, out in (("keys", keys), ("values", values)):
            x = getattr(d, role)
            for start, stop in zip(CUTS[:-1], CUTS[1:], strict=True):
                coder, enc = _code(spec, role, x, d, start, stop)
                block = block_for(coder, enc)
                assert isinstance(block, kind)
                out.append((block, skip if start == 0 else 0))
                decoded[role].append(coder.decode(enc)[:, (skip if start == 0 else 0):])
            decoded[role].append(torch.from_numpy(x[:, CUTS[-1]:]))
        k, v = torch.cat(decoded["keys"], 1), torch.cat(decoded["values"], 1)  # (3, T, 64)
        total = k.shape[1]
        kpos = torch.arange(skip, 256)
        mask = kpos[None, :] <= torch.from_numpy(d.query_positions)[:, None]  # (32, T) causal
        got = attend(q, keys, torch.from_numpy(d.keys[:, CUTS[-1]:]), values,
                     torch.from_numpy(d.values[:, CUTS[-1]:]), mask[None], d.scaling)
        kk, vv = k.double().repeat_interleave(3, 0), v.double().repeat_interleave(3, 0)
        scores = (q.double() @ kk.transpose(1, 2) * d.scaling).masked_fill(~mask[None], float("-inf"))
        want = torch.softmax(scores, -1) @ vv  # (9, 32, 64)
        assert total == 256 - skip
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
