"""``lowbit-tp bench-e2e``: end-to-end TP generation latency per network, TP degree and codec.

Every measurement is a real TP run: ``tp`` separate processes started torchrun-style
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), over gloo, each running
:func:`~lowbit_tp.runtime.engine.rank_main` on its shard. Networks:

* ``loopback``: all ranks in the root namespace, on 127.0.0.1.
* a tc rate such as ``10gbit`` or ``1gbit``: one network namespace per rank
  (:func:`~lowbit_tp.bench.netns.emulated_link`), each rank's egress shaped to that rate;
  the ranks run under ``ip netns exec``.

The ranks run :func:`~lowbit_tp.bench.e2e.worker.worker_main` (``python -m lowbit_tp.bench.e2e --worker``), which is
``lowbit-tp run``'s torchrun path plus two timers passed in as
:class:`~lowbit_tp.tp.CommHooks`: one around every row-parallel all-reduce (encode + wire +
decode + sum), one around the backend collectives inside it (``all_gather``,
``all_to_all_single``, ``all_reduce``: the wire), each preceded by a barrier timed apart as
skew (waiting for the slower rank), so the wire timer measures transfer, not imbalance.
Per prompt, rank 0 reports prefill time, per-token decode time, both timers, and the bytes
it sent (:class:`~lowbit_tp.collectives.CommStats`, counted from the payloads).

Each run generates after one warm-up prompt and then ``repeats`` times each prompt length;
the table shows medians, and ratios against the ``bf16`` ``gather`` baseline (16 bits on
the wire) of the same network, TP degree and prompt length. ``exact`` (the backend's own
all-reduce in the model dtype, fp32 on CPU: 32 bits on the wire) is reported alongside.

The default model is a Llama-shaped checkpoint with random weights, written to a temporary
directory: hidden size, head counts and the prompt length decide the communicated volume,
not the weights, so latencies are those of a real model of that shape (its outputs are
meaningless). ``--model`` takes a registry name or checkpoint directory instead.

The per-packet delay of an emulated link needs the kernel's netem qdisc; where it is missing
the links are rate-limited only (see ``scripts/netns.sh``).

Modules (the config is :class:`~lowbit_tp.configs.E2EConfig`): ``model`` (random Llama, prompts), ``worker`` (one
rank, timers as :class:`~lowbit_tp.tp.CommHooks`), ``launch`` (rank processes), ``run``
(the sweep), ``report`` (rows, ratios, markdown) (``lowbit-tp bench-e2e`` is :mod:`lowbit_tp.cli.bench`).
"""
from lowbit_tp.configs import E2EConfig
from lowbit_tp.bench.e2e.model import make_prompt, save_random_llama
from lowbit_tp.bench.e2e.report import render_markdown
from lowbit_tp.bench.e2e.run import run_e2e_bench

__all__ = ["E2EConfig", "make_prompt", "render_markdown", "run_e2e_bench", "save_random_llama"]
