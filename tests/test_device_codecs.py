"""Device forms of the codecs (kvtool.runtime) against their numpy references, on real captured layers.

Contract: on CPU the torch form stores exactly the reference's arrays (names, dtypes, shapes, every byte)
and decodes to the reference's decoding. Adding a device form = one row in ``SPECS``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _real_cache import SAMPLE

from kvtool.codecs import REGISTRY, LayerContext, parse_spec
from kvtool.runtime import bitpack
from kvtool.runtime.backends import TABLE, device_codec, has_device_form
from kvtool.runtime.device import HostCodec, to_numpy
from kvtool.store import CacheReader

SPECS = [
    "turboquant:bits=3", "turboquant:bits=1", "turboquant:bits=2", "turboquant:bits=4", "turboquant:bits=5",
    "turboquant:bits=3,seed=7",
    "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true",
    "turboquant:bits=3,center=true,sink=1", "turboquant:bits=2,norm_bits=8", "turboquant:bits=4,unbiased=true",
    "uniform:bits=4", "uniform:bits=1,group=16", "uniform:bits=3,group=32", "uniform:bits=8,axis=channel",
    "uniform:bits=2,axis=channel,group=64", "uniform:bits=3,axis=channel,group=48",
    "kivi:bits=2,axis=channel,group=32,residual=64", "kivi:bits=4,axis=token,group=32,residual=64",
    "kivi:bits=2,axis=token,group=64,residual=0", "kivi:bits=2,axis=channel,group=32,residual=100",
    "fp8:format=e4m3", "fp8:format=e5m2",
    "streaming:keep=0.25", "knorm:keep=0.5", "h2o:keep=0.5", "snapkv:keep=0.25,window=8", "tova:keep=0.75,sink=1",
    "tova:keep=0.5,per_head=true",
    "h2o:keep=0.5+turboquant:bits=3", "knorm:keep=0.5+kivi:bits=2,axis=channel,group=32,residual=16",
    "snapkv:keep=0.5,per_head=true+turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true",
    "h2o:keep=0.5+fp8",
]


@pytest.fixture(scope="module")
def layers():
    with CacheReader(SAMPLE) as r:
        return [r.layer(i) for i in (0, 21)]


def _context(d, role: str, start: int = 0) -> LayerContext:
    t = d.keys.shape[1]
    return LayerContext(layer=d.layer, role=role, keys=d.keys, values=d.values, queries=d.queries,
                        query_positions=d.query_positions, key_positions=np.arange(start, start + t),
                        scaling=d.scaling)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("role", ["keys", "values"])
def test_device_form_stores_the_references_arrays(layers, spec, role):
    for d in layers:
        x = getattr(d, role)
        ref = parse_spec(spec).for_role(role)
        ref.fit(x, _context(d, role))
        want = ref.encode(x)
        dev = device_codec(parse_spec(spec).for_role(role))
        assert dev.on_device, spec
        dev.fit(torch.from_numpy(x), np.arange(x.shape[1]), lambda d=d: _context(d, role))
        got = dev.encode(torch.from_numpy(x))
        assert all(isinstance(v, torch.Tensor) for v in got.arrays.values())
        host = to_numpy(got)
        assert sorted(host.arrays) == sorted(want.arrays), spec
        for k, v in want.arrays.items():
            assert host.arrays[k].dtype == v.dtype and host.arrays[k].shape == v.shape, (spec, k)
            assert np.array_equal(host.arrays[k].view(np.uint8), v.view(np.uint8)), (spec, k)
        assert host.meta == want.meta and host.shape == want.shape and got.nbytes == want.nbytes
        np.testing.assert_allclose(dev.decode(got).numpy(), ref.decode(want), rtol=0, atol=1e-5)
        mask, ref_mask = dev.token_mask(got), ref.token_mask(want)
        assert (mask is None) == (ref_mask is None)
        if mask is not None:
            assert np.array_equal(mask.numpy(), ref_mask)


def test_a_later_block_keeps_its_sink_positions(layers):
    x = layers[0].keys
    spec = "turboquant:bits=3,center=true,sink=4"
    ref, dev = parse_spec(spec), device_codec(parse_spec(spec))
    ref.fit(x, LayerContext(key_positions=np.arange(2, 2 + x.shape[1])))
    dev.fit(torch.from_numpy(x), np.arange(2, 2 + x.shape[1]))
    want, got = ref.encode(x), to_numpy(dev.encode(torch.from_numpy(x)))
    assert got.arrays["sink_rows"].shape[1] == 2
    assert all(np.array_equal(got.arrays[k], v) for k, v in want.arrays.items())


def test_every_registered_codec_with_a_device_form_is_in_the_table():
    with_form = {name for name, cls in REGISTRY.items() if cls in TABLE}
    covered = {spec.split(":")[0].split("+")[-1] for spec in SPECS} | {s.split(":")[0] for s in SPECS}
    assert with_form <= covered
    assert has_device_form(parse_spec("turboquant:bits=3"))
    assert isinstance(device_codec(parse_spec("turboquant:bits=3,variant=prod")), HostCodec)  # reference
    assert isinstance(device_codec(parse_spec("turboquant:bits=2.5")), HostCodec)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 13, 64, 1001])
def test_torch_bitpack_is_the_numpy_layout(bits, count):
    from kvtool.codecs import bitpack as ref

    codes = np.random.default_rng(bits * 1000 + count).integers(0, 1 << bits, count).astype(np.uint8)
    packed = bitpack.pack(torch.from_numpy(codes), bits)
    assert np.array_equal(packed.numpy(), ref.pack(codes, bits))
    assert np.array_equal(bitpack.unpack(packed, bits, count).numpy(), codes)


def test_packbits_rows_is_numpys():
    bits = np.random.default_rng(0).random((3, 37)) > 0.5
    packed = bitpack.packbits_rows(torch.from_numpy(bits))
    assert np.array_equal(packed.numpy(), np.packbits(bits, axis=1))
    assert np.array_equal(bitpack.unpackbits_rows(packed, 37).numpy(), bits)
