"""Token selectors: keep some rows (tokens) per KV head, drop the rest (eviction).

A new selector goes here, one module per codec, on ``selection.py``'s shared machinery (budgets, protected
tokens, AdaKV head-adaptive budgets, attention of the observed queries). A selector is a
:class:`~kvtool.codecs.base.Stage`: ``snapkv:keep=0.5+kivi:bits=4`` codes the kept rows with the next codec.
"""
