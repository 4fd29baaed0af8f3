"""Quantizers: every token kept, each element stored in fewer bits.

A new quantizer goes here, one module per codec. ``group.py`` is the shared machinery of group-wise
quantizers (a subclass writes only ``quantize``/``dequantize``); ``rotation.py`` (seeded rotations and
projections), ``lloydmax.py`` (Lloyd-Max codebooks) and ``qjl.py``'s sign sketch are shared by the rotated
quantizers (``turboquant``, ``polarquant``). Reference points: ``none`` (the input itself), ``fp16``,
``fp8``.
"""
