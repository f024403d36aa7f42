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


def _loglikelihoods(res):
    return [float(r[0]) for sample in res["samples"]["shakespeare_lastword"] for r in sample["filtered_resps"]]


@pytest.mark.slow  # 25 s (four lm-eval runs of a tiny model): the slow suite
def test_adapter_runs_an_offline_task_bf16_matches_plain_hf_and_codecs_differ(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from lowbit_tp.evaluation.lm_eval_adapter import SimulatedTPLM
    from lowbit_tp.models.registry import ModelInfo
    from test_simulator import tiny_model

    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    tm = _task(tmp_path)
    model = tiny_model("llama")
    # No hub access here: a local word-level tokenizer whose vocabulary holds every word of
    # the task (ids 1-100 of the tiny model, round robin), so contexts and choices differ.
    words = sorted({w for line in (tmp_path / "lastword.jsonl").read_text().splitlines()
                    for d in [json.loads(line)] for w in (d["context"] + " " + " ".join(d["choices"])).split()})
    vocab = {"[UNK]": 0, **{w: 1 + i % 100 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]")
    assert len(set(tok("To be or not to be")["input_ids"])) > 1
    info = ModelInfo(name="tiny", source="memory", weights_sha256=None, model_type="llama", hidden_size=64,
                     num_layers=2)

    plain = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"),
                            tasks=["shakespeare_lastword"], task_manager=tm, log_samples=True)
    runs = {}
    for codec in ("bf16", "int4-g32"):
        lm = SimulatedTPLM(tp=2, codec=codec, algorithm="gather", bundle=(model, tok, info), batch_size=4)
        runs[codec] = simple_evaluate(model=lm, tasks=["shakespeare_lastword"], task_manager=tm, log_samples=True)
        lm.close()
        assert lm.simulator.comm_stats().calls > 0  # the collectives really ran
    ref, bf16, int4 = (_loglikelihoods(r) for r in (plain, runs["bf16"], runs["int4-g32"]))
    assert len(ref) == len(bf16) == len(int4) == 4 * 12 and len(set(ref)) > 12  # distinct choices score differently
    assert max(abs(a - b) for a, b in zip(ref, bf16)) < 1e-3  # bf16 on the wire: the plain model, to rounding
    assert max(abs(a - b) for a, b in zip(ref, int4)) > 10 * max(abs(a - b) for a, b in zip(ref, bf16))
    a = plain["results"]["shakespeare_lastword"]["acc,none"]
    b = runs["bf16"]["results"]["shakespeare_lastword"]["acc,none"]
    assert 0.0 <= b <= 1.0 and abs(a - b) < 1e-9
