"""Shared fixtures: offline, CPU-only, tiny models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:////tmp/aape-tests-never-default.db")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from aape.config import Params, load_params  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHARED_ASSETS = SHARED / "assets"


def shared_asset(*parts: str) -> Path:
    """Path to a reference asset in ../shared/assets; skips the test when it is absent."""
    path = SHARED_ASSETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference asset {path} not present (../shared is only beside a developer checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_backbone():
    """A tiny random CLIP (d=64, 32px), built once per session in well under a second."""
    from aape.backbone import load_backbone
    from aape.config import BackboneConfig

    return load_backbone(BackboneConfig(model="aape-tiny", pretrained="random-init"), device="cpu")


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    """Defaults adjusted for speed: tiny backbone, outputs and cache in a temp dir, no tracking."""
    return load_params(
        None,
        [
            f"run.output_dir={tmp_path / 'artifacts'}",
            f"run.cache_dir={tmp_path / 'cache'}",
            "run.seeds=[1]",
            "backbone.model=aape-tiny",
            "backbone.pretrained=random-init",
            "tracking.enabled=false",
            "features.num_workers=0",
            "features.augmented_views=2",
        ],
    )


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite, 127.0.0.1) for the session's flow tests, stopped after."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def single_torch_thread():
    """For modules of tiny models: on a shared CPU, extra threads cost more in synchronisation than they give."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_LM_WORDS = (
    "a an the small large big red blue green yellow gray teal black brown circle rectangle triangle shape "
    "image of with is what color does contain yes no Q A : ? . , there this picture"
).split()


def write_tiny_lm(folder: Path, words=TINY_LM_WORDS, width: int = 32) -> Path:
    """A randomly initialised 2-layer GPT-2 with a word-level tokenizer over `words`, saved as a model
    folder (config.json, weights, tokenizer): what prefix.lm accepts as a local path, built offline in
    well under a second."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<eos>", "\n", *dict.fromkeys(words)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=256, n_embd=width, n_layer=2, n_head=2,
                        initializer_range=0.3, bos_token_id=vocab["<eos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"])
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))
