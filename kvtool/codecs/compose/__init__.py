"""Wrappers that compose other codecs: ``age[...]`` (a codec per band of token age) and ``heads[...]`` (a
codec per KV head, how plans give heads different codecs). Stage chaining (``a+b``) is
:class:`~kvtool.codecs.base.Composed`; per-layer choice is :mod:`kvtool.codecs.assignment`.
"""
