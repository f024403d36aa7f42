"""Engines that lowbit-tp plugs into. Each integration imports its engine lazily, so
``import lowbit_tp`` never needs the engine installed.

* :mod:`lowbit_tp.integrations.transformers` - the ``lowbit_rowwise`` style for
  transformers' own TP (``from_pretrained(distributed_config=...)``).
* :mod:`lowbit_tp.integrations.dtensor` - a ``ParallelStyle`` for PyTorch's
  ``parallelize_module``.
* :mod:`lowbit_tp.integrations.vllm` - a vLLM general plugin whose row-parallel layers
  reduce their partials through the compressed all-reduce.
"""
