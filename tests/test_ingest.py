"""load_model on every supported input form, and its refusals."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from tritpress.compressor import load_model
from tritpress.compressor.errors import TritpressError, UnsafeCheckpointError
from tests.tiny_models import LSTMLM, build, make_gpt2, run

HF = ["bert", "gpt2", "llama_tied", "llama_untied"]


def write_config(model, path, architectures=True):
    cfg = model.config
    if architectures:
        cfg.architectures = [type(model).__name__]   # what save_pretrained records
    cfg.to_json_file(str(path))
    return str(path)


class Evil:
    """Unpickling this runs a shell command (it must never happen without opt-in)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------ HF folder

@pytest.mark.parametrize("name", HF)
def test_hf_folder(name, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    m = loaded.model
    assert type(m) is type(model)
    assert not m.training
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert loaded.source.kind == "hf" and loaded.source.model_class == type(model).__name__
    assert loaded.source.hf_config["model_type"] == model.config.model_type
    assert torch.equal(run(m), run(model))
    if name in ("gpt2", "llama_tied"):
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(TritpressError, match="config.json"):
        load_model(str(tmp_path))


# ------------------------------------------------------------------ state_dict + config

@pytest.mark.parametrize("name", HF)
def test_state_dict_pt_with_config(name, tmp_path):
    model = build(name)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    cfg = write_config(model, tmp_path / "config.json")
    loaded = load_model(str(tmp_path / "w.pt"), config=cfg)
    assert type(loaded.model) is type(model)
    assert loaded.source.kind == "state_dict"
    assert torch.equal(run(loaded.model), run(model))


@pytest.mark.parametrize("name, expected_class", [("bert", "BertModel"), ("gpt2", "GPT2LMHeadModel")])
def test_state_dict_with_config_lacking_architectures(name, expected_class, tmp_path):
    # model.config.to_json_file() writes no 'architectures': the class whose parameter names fit wins
    model = build(name)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    model.config.to_json_file(str(tmp_path / "config.json"))
    loaded = load_model(str(tmp_path / "w.pt"), config=str(tmp_path / "config.json"))
    assert type(loaded.model).__name__ == expected_class
    assert torch.equal(run(loaded.model), run(model))


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model"])
def test_wrapped_state_dict(wrapper, tmp_path):
    model = build("llama_untied")
    torch.save({wrapper: model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    loaded = load_model(str(tmp_path / "ckpt.pt"), config=write_config(model, tmp_path / "config.json"))
    assert torch.equal(run(loaded.model), run(model))


def test_safetensors_state_dict_with_config(tmp_path):
    model = build("llama_untied")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = load_model(str(tmp_path / "w.safetensors"), config=write_config(model, tmp_path / "c.json"))
    assert torch.equal(run(loaded.model), run(model))


def test_safetensors_tied_state_dict_without_alias_key(tmp_path):
    # safetensors cannot hold shared tensors: the tied lm_head.weight is left out and re-tied on load
    model = build("gpt2")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_model(str(tmp_path / "w.safetensors"), config=write_config(model, tmp_path / "c.json"))
    m = loaded.model
    assert m.lm_head.weight is m.transformer.wte.weight
    assert torch.equal(run(m), run(model))


def test_missing_untied_key_is_refused(tmp_path):
    model = build("llama_untied")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(TritpressError, match="missing"):
        load_model(str(tmp_path / "w.pt"), config=write_config(model, tmp_path / "c.json"))


def test_state_dict_of_another_model_is_refused(tmp_path):
    llama, bert = build("llama_untied"), build("bert")
    torch.save(llama.state_dict(), tmp_path / "w.pt")
    with pytest.raises(TritpressError, match="does not fit"):
        load_model(str(tmp_path / "w.pt"), config=write_config(bert, tmp_path / "c.json"))


def test_extra_keys_are_refused(tmp_path):
    model = build("bert")
    state = dict(model.state_dict())
    state["something.else"] = torch.zeros(2)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(TritpressError, match="unexpected"):
        load_model(str(tmp_path / "w.pt"), config=write_config(model, tmp_path / "c.json"))


def test_state_dict_with_wrong_shapes_is_refused(tmp_path):
    from transformers import GPT2LMHeadModel
    from tests.tiny_models import gpt2_config
    model = build("gpt2")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    wider = GPT2LMHeadModel(gpt2_config(n_embd=64))   # same keys, every hidden dim doubled
    with pytest.raises(TritpressError):
        load_model(str(tmp_path / "w.pt"), config=write_config(wider, tmp_path / "c.json"))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_state_dict_without_config_asks_for_it(suffix, tmp_path):
    model = build("bert")
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    with pytest.raises(TritpressError, match="--config"):
        load_model(str(path))


def test_unreadable_config_is_refused(tmp_path):
    model = build("bert")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "c.json").write_text("{ not json")
    with pytest.raises(TritpressError, match="config"):
        load_model(str(tmp_path / "w.pt"), config=str(tmp_path / "c.json"))
    with pytest.raises(TritpressError, match="config"):
        load_model(str(tmp_path / "w.pt"), config=str(tmp_path / "missing.json"))


def test_config_without_model_type_is_refused(tmp_path):
    model = build("bert")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "c.json").write_text('{"hidden_size": 32}')
    with pytest.raises(TritpressError, match="model_type"):
        load_model(str(tmp_path / "w.pt"), config=str(tmp_path / "c.json"))


# ------------------------------------------------------------------ whole pickled modules

def test_pickled_module_needs_trust_pickle(tmp_path):
    torch.manual_seed(0)
    model = LSTMLM().eval()
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle") as exc:
        load_model(str(tmp_path / "model.pt"))
    assert isinstance(exc.value, TritpressError)
    loaded = load_model(str(tmp_path / "model.pt"), trust_pickle=True)
    assert isinstance(loaded.model, LSTMLM) and not loaded.model.training
    assert loaded.source.kind == "module"
    assert loaded.source.model_class == "tests.tiny_models.LSTMLM"
    assert not loaded.source.is_transformers
    assert torch.equal(run(loaded.model), run(model))


def test_pickled_half_precision_module_is_loaded_as_float32(tmp_path):
    torch.manual_seed(0)
    model = LSTMLM().eval().half()
    torch.save(model, tmp_path / "model.pt")
    m = load_model(str(tmp_path / "model.pt"), trust_pickle=True).model
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert torch.equal(m.emb.weight, model.emb.weight.float())


def test_pickled_transformers_module_keeps_its_config(tmp_path):
    model = make_gpt2()
    torch.save(model, tmp_path / "gpt2.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_model(str(tmp_path / "gpt2.pt"))
    loaded = load_model(str(tmp_path / "gpt2.pt"), trust_pickle=True)
    assert loaded.source.model_class == "GPT2LMHeadModel" and loaded.source.is_transformers
    assert torch.equal(run(loaded.model), run(model))


def test_trusted_non_module_object_is_refused(tmp_path):
    torch.save([torch.zeros(2), torch.ones(3)], tmp_path / "list.pt")
    with pytest.raises(TritpressError, match="not an nn.Module"):
        load_model(str(tmp_path / "list.pt"), trust_pickle=True)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("with_config", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(how, with_config, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    if how == "torch.save":
        torch.save({"weight": Evil(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(Evil(marker), f)
    assert not marker.exists()
    config = None
    if with_config:
        config = write_config(build("bert"), tmp_path / "config.json")
    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle"):
        load_model(str(path), config=config)
    assert not marker.exists(), "the pickle payload ran"


# ------------------------------------------------------------------ missing and garbage inputs

def test_missing_path(tmp_path):
    with pytest.raises(TritpressError, match="no such file"):
        load_model(str(tmp_path / "nothing.pt"))
    with pytest.raises(TritpressError):
        load_model(str(tmp_path / "sub" / "dir"))


@pytest.mark.parametrize("content", [
    b"PK\x03\x04 broken zip",
    b"\x80\x02}q\x00.",
    b"hello, this is not a checkpoint",
    b"",
])
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_garbage_file_is_a_tritpress_error(content, suffix, tmp_path):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(content)
    with pytest.raises(TritpressError):
        load_model(str(path))


def test_random_bytes_are_not_reported_as_unsafe_pickle(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TritpressError) as exc:
        load_model(str(path))
    assert not isinstance(exc.value, UnsafeCheckpointError)


def test_garbage_safetensors_with_config_is_refused(tmp_path):
    model = build("bert")
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(TritpressError, match="safetensors"):
        load_model(str(tmp_path / "w.safetensors"), config=write_config(model, tmp_path / "c.json"))


def test_non_tensor_mapping_is_not_a_state_dict(tmp_path):
    torch.save({"a": 1, "b": "text"}, tmp_path / "d.pt")
    model = build("bert")
    with pytest.raises(TritpressError, match="not a state_dict"):
        load_model(str(tmp_path / "d.pt"), config=write_config(model, tmp_path / "c.json"))
