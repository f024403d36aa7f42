"""An lm-evaluation-harness model that runs through the TP simulator with a codec.

Users with the paper's task data (ARC, HellaSwag, PIQA, WinoGrande) can score a
compressed-communication model exactly as they score any HF model::

    from lowbit_tp.evaluation.lm_eval_adapter import SimulatedTPLM
    lm = SimulatedTPLM(model="smollm2-135m", tp=3, codec="int4-outlier", calibration="cal.safetensors")
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy", "piqa"])

or from the harness CLI: ``lm_eval --model lowbit-tp --model_args model=smollm2-135m,tp=3,codec=int4-outlier,calibration=cal.safetensors``
(after ``import lowbit_tp.evaluation.lm_eval_adapter`` registers it; see README).
``lm_eval`` is an optional dependency, imported only here.
"""
from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lowbit_tp.calibration import Calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.configs import DEFAULT_ALGORITHM
from lowbit_tp.models import load_model
from lowbit_tp.simulator import TPSimulator


@register_model("lowbit-tp")
class SimulatedTPLM(HFLM):
    """HFLM whose row-parallel layers run as simulated TP with a (compressed) all-reduce.

    Args: ``model`` (registry name or path), ``tp``, ``codec`` (default ``bf16``),
    ``algorithm`` (default ``gather``), ``calibration`` (artifact path; static codecs),
    ``batch_size``. The simulator stays installed for the object's lifetime.
    """

    def __init__(self, model: str = "smollm2-135m", tp: int = 1, codec: str = "bf16", algorithm: str = DEFAULT_ALGORITHM,
                 calibration: str | None = None, batch_size: int = 8, bundle=None, **kwargs):
        hf_model, tokenizer, info = bundle if bundle is not None else load_model(model)
        cal = Calibration.load_for(calibration, tp=int(tp), model=info)
        self.simulator = TPSimulator(hf_model, tp=int(tp), codec=make_codec(codec, calibration=cal),
                                     algorithm=algorithm, name=info.name)
        self.simulator.__enter__()
        self.model_info = info
        super().__init__(pretrained=hf_model, tokenizer=tokenizer, batch_size=int(batch_size), device="cpu", **kwargs)

    def close(self) -> None:
        """Put the model's original layers back."""
        self.simulator.__exit__(None, None, None)
