"""Shared tiny-model fixtures. Every model is built in code with random weights
(hidden 32, 2-3 layers, vocab 100): the suite never touches the network."""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import (FACTORIES, SKELETONS, LSTMLM, VOCAB, build, main_output, run,  # noqa: F401
                               sample_ids)

HF_MODELS = ["bert", "gpt2", "llama_tied", "llama_untied"]
ALL_MODELS = list(FACTORIES)


# the tiny-model test modules: one intra-op thread is faster for 32-wide tensors and does not
# collapse when the 2 cores are shared with another process (thread oversubscription)
SINGLE_THREAD_MODULES = {"test_quantize", "test_packing", "test_packed", "test_ingest", "test_structure",
                         "test_eval_cli", "test_finetune", "test_eval_metrics", "test_share", "test_share_cli",
                         "test_next_token"}


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    yield


@pytest.fixture(autouse=True)
def _single_thread(request):
    if request.module.__name__.rsplit(".", 1)[-1] not in SINGLE_THREAD_MODULES:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=ALL_MODELS)
def any_model(request):
    """(name, freshly built eval-mode model)."""
    return request.param, build(request.param)


@pytest.fixture(params=HF_MODELS)
def hf_model(request):
    return request.param, build(request.param)


@pytest.fixture
def ids():
    return sample_ids()


@pytest.fixture
def lstm():
    torch.manual_seed(0)
    return LSTMLM().eval()
