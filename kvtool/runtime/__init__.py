"""kvtool's runtime: what a :class:`kvtool.CodecCache` runs inside the model, on the model's device.

* :mod:`~kvtool.runtime.device`, :mod:`~kvtool.runtime.backends` — the device-codec contract and which torch
  form codes a codec (TurboQuant, uniform, KIVI, fp8, token selectors); the numpy codecs in
  :mod:`kvtool.codecs` stay the reference that ``kvtool compress`` runs, and the two agree code for code.
* :mod:`~kvtool.runtime.bitpack` — the packed-code layout of :mod:`kvtool.codecs.bitpack`, in torch.
* :mod:`~kvtool.runtime.compact` — the compact track: a cache layer's keys or values held as coded blocks and
  a precise window only, decoded for the attention call that needs them.
* :mod:`~kvtool.runtime.code_attention` — attention computed from TurboQuant and uniform/KIVI codes.
* :mod:`~kvtool.runtime.memory` — the outside count of the bytes an object holds.

It sits below :mod:`kvtool.cache` (which wires it into transformers) and above :mod:`kvtool.codecs`.
docs/RUNTIME.md describes it.
"""
