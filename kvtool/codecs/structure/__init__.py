"""Structural codecs: change the shape of what is stored rather than the bits of each element.

Low-rank projection (``lowrank``, a :class:`~kvtool.codecs.base.Stage`), learned codebooks (``pq``, ``vq`` on
``learned.py``'s faiss k-means), and cross-layer sharing (``minicache`` on ``crosslayer.py``'s
:class:`~kvtool.codecs.structure.crosslayer.PairCodec`, which codes two adjacent layers together).
"""
