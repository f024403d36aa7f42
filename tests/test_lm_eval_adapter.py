"""The lm-evaluation-harness adapter on an offline multiple-choice task built from packaged text."""
import json
import random

import pytest

lm_eval = pytest.importorskip("lm_eval")


def _task(tmp_path, n=12):
    from lowbit_tp.data import load_split

    # Last-word multiple choice from held-out plays: the true final word of a line vs three
    # words taken from other lines.
    lines = [l.strip() for d in load_split().evaluation[:2] for l in d.text.splitlines() if len(l.split()) >= 6]
    rng = random.Random(0)
    picked = rng.sample(lines, n + 30)
    docs = []
    for i, line in enumerate(picked[:n]):
        words = line.split()
        wrong = [picked[n + 3 * i % 30 + j].split()[-1] for j in range(3)]
        choices = [words[-1]] + wrong
        rng.shuffle(choices)
        docs.append({"context": " ".join(words[:-1]), "choices": choices, "label": choices.index(words[-1])})
    data = tmp_path / "lastword.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "lastword.yaml").write_text(f"""task: shakespeare_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tmp_path))


def test_adapter_runs_an_offline_task_and_bf16_matches_plain_hf(tmp_path):
    from lm_eval.models.huggingface import HFLM

    from lowbit_tp.evaluation.lm_eval_adapter import SimulatedTPLM
    from lowbit_tp.models.registry import ModelInfo
    from test_simulator import tiny_model

    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    tm = _task(tmp_path)
    model = tiny_model("llama")
    # No hub access here: a local word-level tokenizer over the tiny model's vocabulary.

    raw = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_tokens([f"w{i}" for i in range(99)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]")
    info = ModelInfo(name="tiny", source="memory", weights_sha256=None, model_type="llama", hidden_size=64,
                     num_layers=2)
    from lm_eval import simple_evaluate

    plain = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"),
                                    tasks=["shakespeare_lastword"], task_manager=tm)
    lm = SimulatedTPLM(tp=2, codec="bf16", algorithm="gather", bundle=(model, tok, info), batch_size=4)
    sim = simple_evaluate(model=lm, tasks=["shakespeare_lastword"], task_manager=tm)
    lm.close()
    a = plain["results"]["shakespeare_lastword"]["acc,none"]
    b = sim["results"]["shakespeare_lastword"]["acc,none"]
    assert 0.0 <= b <= 1.0 and abs(a - b) < 1e-9
    assert lm.simulator.comm_stats().calls > 0  # the collectives really ran
