"""Single-thread encode/decode throughput of each codec, in GB/s of fp32 input."""
from __future__ import annotations

import torch

from lowbit_tp.bench.common import median_seconds
from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import make_codec


def codec_throughput(codecs: list[str], *, tokens: int = 1024, hidden: int = 4096, repeats: int = 7,
                     device: str = "cpu") -> list[dict]:
    """Encode and decode a ``[tokens, hidden]`` fp32 tensor on one thread; median GB/s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cal = synthetic_calibration(["bench"], world=1, hidden=hidden, tokens=256, batches=1)
        x = planted_partials(1, tokens, hidden, seed=0, noise_seed=1)[0].to(device)
        gb = x.numel() * 4 / 1e9
        rows = []
        for name in codecs:
            codec = make_codec(name, calibration=cal)
            payload = codec.encode(x, layer="bench", source=0)
            sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

            def enc():
                codec.encode(x, layer="bench", source=0)
                sync()

            def dec():
                codec.decode(payload, tuple(x.shape), layer="bench", source=0)
                sync()

            te = median_seconds(enc, repeats=repeats)
            td = median_seconds(dec, repeats=repeats)
            rows.append({"codec": name, "device": device, "numel": x.numel(),
                         "bits_per_value": 8 * payload.numel() / x.numel(),
                         "encode_gbps": gb / te, "decode_gbps": gb / td, "encode_decode_gbps": gb / (te + td)})
        return rows
    finally:
        torch.set_num_threads(threads)
