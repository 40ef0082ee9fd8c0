"""Loading an MSST checkpoint: weights and config found together, a state that fits loaded
exactly, one that does not refused in words, before the network is allocated.

Small seeded networks of stemserve's own classes, saved as people save them; no oracle.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from test_msst_checkpoints import _System, refusal, write_config, write_safetensors

from stemserve.checkpoints import msst
from stemserve.checkpoints.msst import config_beside, load_msst
from stemserve.checkpoints.msst_config import BS_ROFORMER, MEL_BAND_ROFORMER
from stemserve.errors import CheckpointError
from stemserve.models.roformer import BSRoformer, MelBandRoformer

# n_fft 256 (129 frequencies), stereo, two heads of 8.
SMALL = dict(dim=16, depth=1, dim_head=8, heads=2, time_transformer_depth=1,
             freq_transformer_depth=1, stft_n_fft=256, stft_hop_length=64,
             stft_win_length=256, stereo=True, mlp_expansion_factor=2)
BANDS = (4,) * 16 + (65,)
MODELS = {BS_ROFORMER: dict(SMALL, freqs_per_bands=BANDS),
          MEL_BAND_ROFORMER: dict(SMALL, num_bands=8, sample_rate=44100)}
CLASSES = {BS_ROFORMER: BSRoformer, MEL_BAND_ROFORMER: MelBandRoformer}
CHUNK = 2048


def config_data(family: str, **model) -> dict:
    """An MSST config of the small network of ``family``, some model fields changed."""
    fields = {**MODELS[family], **model}
    return {"audio": {"chunk_size": CHUNK, "sample_rate": 44100,
                      "num_channels": 2 if fields["stereo"] else 1},
            "model": fields,
            "training": {"instruments": ["vocals", "other"], "target_instrument": "vocals"},
            "inference": {"num_overlap": 2, "batch_size": 1}}


def network(family: str, seed: int = 0, **model) -> torch.nn.Module:
    torch.manual_seed(seed)
    return CLASSES[family](**{**MODELS[family], **model}).eval()


def save(state: dict[str, torch.Tensor], path: Path, layout: str = "bare") -> Path:
    """``state`` as people save it: bare, under ``state_dict``, Lightning's ``model.``
    prefix, or safetensors."""
    if layout == "safetensors":
        return write_safetensors(path, {k: v.contiguous() for k, v in state.items()})
    saved = {"bare": state, "state_dict": {"state_dict": state, "epoch": 7},
             "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()},
                           "global_step": 100}}[layout]
    torch.save(saved, path)
    return path


def saved(tmp_path: Path, family: str = BS_ROFORMER, state: dict | None = None,
          **model) -> Path:
    """``model.ckpt`` holding ``state`` (the small network's by default), ``model.yaml`` of
    the config with ``model`` changed beside it."""
    write_config(tmp_path, config_data(family, **model), "model.yaml")
    return save(network(family).state_dict() if state is None else state,
                tmp_path / "model.ckpt")


def refused(checkpoint: Path, *words: str, config: Path | None = None) -> str:
    """The loader's refusal of ``checkpoint``."""
    return refusal(lambda: load_msst(checkpoint, config), checkpoint, *words)


# =============================================================================================
# What fits loads exactly

@pytest.mark.parametrize("layout, suffix", [("bare", ".ckpt"), ("state_dict", ".ckpt"),
                                            ("lightning", ".ckpt"), ("bare", ".pth"),
                                            ("safetensors", ".safetensors")])
@pytest.mark.parametrize("family", [BS_ROFORMER, MEL_BAND_ROFORMER])
def test_a_checkpoint_loads_as_it_was_saved(tmp_path, family, layout, suffix):
    model = network(family, seed=3)
    write_config(tmp_path, config_data(family), "vocals_model.yaml")
    path = save(model.state_dict(), tmp_path / f"vocals_model{suffix}", layout)
    loaded, info, config = load_msst(path)
    assert type(loaded) is CLASSES[family] and not loaded.training
    assert config.family == family and config.stems == ("vocals", "instrumental")
    assert info.name == "vocals_model" and info.path == path and info.family == family
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.config == config.kwargs() == MODELS[family]
    assert loaded.residual and loaded.sources == ["vocals", "instrumental"]
    assert (loaded.samplerate, loaded.chunk_size) == (config.sample_rate, config.chunk_size)
    assert (loaded.num_overlap, loaded.normalize) == (config.num_overlap, config.normalize)
    torch.manual_seed(1)
    mix = torch.randn(2, 2, CHUNK)
    with torch.no_grad():
        vocals = model(mix)
        # the single target, then the mix minus it: the instrumental
        torch.testing.assert_close(loaded(mix), torch.cat([vocals, mix[:, None] - vocals], 1),
                                   rtol=0, atol=0)


def test_half_precision_weights_load_as_float32(tmp_path):
    model = network(BS_ROFORMER, seed=4)
    half = {k: v.half() for k, v in model.state_dict().items()}
    loaded, _, _ = load_msst(saved(tmp_path, state=half))
    assert {p.dtype for p in loaded.state_dict().values()} == {torch.float32}
    model.load_state_dict({k: v.float() for k, v in half.items()})
    mix = torch.randn(1, 2, CHUNK)
    loaded.residual = False
    with torch.no_grad():
        torch.testing.assert_close(loaded(mix), model(mix), rtol=0, atol=0)


def test_loading_leaves_the_random_stream_as_it_was(tmp_path):
    path = saved(tmp_path)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    load_msst(path)
    assert torch.equal(torch.rand(4), expected)


# =============================================================================================
# Which config

def test_the_yaml_beside_is_found(tmp_path):
    checkpoint = tmp_path / "model_bs_roformer_ep_317_sdr_12.9755.ckpt"
    yml = tmp_path / "model_bs_roformer_ep_317_sdr_12.9755.yml"
    yml.write_text("")
    assert config_beside(checkpoint) == yml
    yaml = tmp_path / "model_bs_roformer_ep_317_sdr_12.9755.yaml"
    yaml.write_text("")
    assert config_beside(checkpoint) == yaml  # .yaml first


def test_an_explicit_config_wins(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "configs").mkdir()
    path = save(network(MEL_BAND_ROFORMER).state_dict(), tmp_path / "weights" / "kim.ckpt")
    other = write_config(tmp_path / "configs", config_data(MEL_BAND_ROFORMER), "other.yaml")
    _, _, config = load_msst(path, other)
    assert config.path == str(other) and config.family == MEL_BAND_ROFORMER
    # A config beside of another model is not read when one is named.
    write_config(tmp_path / "weights", config_data(BS_ROFORMER), "kim.yaml")
    assert load_msst(path, other)[2].path == str(other)
    refused(path, "does not fit its config", str(tmp_path / "weights" / "kim.yaml"))


def test_a_missing_config_names_the_expected_path(tmp_path):
    path = save(network(BS_ROFORMER).state_dict(), tmp_path / "model.ckpt")
    message = refused(path, str(tmp_path / "model.yaml"), "model.yml", "--config other.yaml")
    assert "folder holds" not in message
    (tmp_path / "config_vocals_bs_roformer.yaml").write_text("")
    refused(path, "the folder holds 'config_vocals_bs_roformer.yaml'")


def test_a_missing_checkpoint(tmp_path):
    write_config(tmp_path, config_data(BS_ROFORMER), "model.yaml")
    refused(tmp_path / "model.ckpt", "no checkpoint file")


def test_a_bad_config_is_refused_before_the_weights_are_read(tmp_path, monkeypatch):
    path = saved(tmp_path, dim=0)
    monkeypatch.setattr(msst, "read_state_dict", lambda _: pytest.fail("weights read"))
    with pytest.raises(CheckpointError, match="model.dim=0 is out of bounds") as caught:
        load_msst(path)
    assert str(tmp_path / "model.yaml") in str(caught.value)


# =============================================================================================
# What does not fit is refused in words

@pytest.mark.parametrize("family, model, words", [
    (BS_ROFORMER, {"freqs_per_bands": (8,) * 8 + (65,)},
     "the config has 9 bands (model.freqs_per_bands), the weights 17: is it the config of "
     "another model?"),
    (MEL_BAND_ROFORMER, {"num_bands": 10},
     "the config has 10 bands (model.num_bands), the weights 8"),
    (BS_ROFORMER, {"freqs_per_bands": (4,) * 15 + (8, 61)},
     "the bands cover other frequencies (model.freqs_per_bands): band 15 has 8 frequencies "
     "in the config, 4 in the weights, band 16 has 61 frequencies in the config, 65 in the "
     "weights"),
    (MEL_BAND_ROFORMER, {"stereo": False},
     "the config separates 1 channel(s) (model.stereo=False), the weights 2"),
    (BS_ROFORMER, {"dim": 32}, "the config has dim 32, the weights 16"),
    (BS_ROFORMER, {"depth": 2}, "the config has 2 layers (model.depth), the weights 1"),
    (MEL_BAND_ROFORMER, {"mask_estimator_depth": 2}, "the MelBandRoformer its config "
                                                     "describes has other tensors"),
])
def test_a_config_of_another_model_is_refused(tmp_path, family, model, words):
    write_config(tmp_path, config_data(family, **model), "model.yaml")
    path = save(network(family).state_dict(), tmp_path / "model.ckpt")
    refused(path, str(tmp_path / "model.yaml"), words)


def test_a_config_of_more_stems(tmp_path):
    data = config_data(BS_ROFORMER, num_stems=2)
    data["training"] = {"instruments": ["vocals", "other"]}
    write_config(tmp_path, data, "model.yaml")
    path = save(network(BS_ROFORMER).state_dict(), tmp_path / "model.ckpt")
    refused(path, "the config has 2 stems (model.num_stems), the weights 1",
            "not in the weights ('mask_estimators.1.")


def test_missing_and_unexpected_tensors_are_counted_and_named(tmp_path):
    state = network(BS_ROFORMER).state_dict()
    dropped = [name for name in state if name.startswith("layers.0.1.")]
    for name in dropped:
        del state[name]
    state["extra.weight"] = torch.zeros(3)
    state["another.bias"] = torch.zeros(1)
    message = refused(saved(tmp_path, state=state),
                      f"{len(dropped)} tensor(s) of the network are not in the weights "
                      f"({dropped[0]!r}, {dropped[1]!r}, {dropped[2]!r}, ...)",
                      "2 tensor(s) of the weights are not in the network ('extra.weight', "
                      "'another.bias')")
    assert "another shape" not in message


def test_tensors_of_another_shape_are_named(tmp_path):
    state = network(BS_ROFORMER).state_dict()
    name = "layers.0.0.layers.0.0.to_qkv.weight"
    state[name] = state[name].t().contiguous()
    refused(saved(tmp_path, state=state),
            f"1 tensor(s) have another shape ('{name}' is [16, 48] in the weights, [48, 16] "
            f"in the network)")


def test_a_tensor_that_is_not_float_is_refused(tmp_path):
    state = network(BS_ROFORMER).state_dict()
    state["final_norm.gamma"] = torch.ones(16, dtype=torch.int64)
    refused(saved(tmp_path, state=state), "'final_norm.gamma'", "not a float tensor")


def test_a_ckpt_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    write_config(tmp_path, config_data(BS_ROFORMER), "model.yaml")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": network(BS_ROFORMER).state_dict(),
                "hook": _System(f"touch {marker}")}, path)
    refused(path, "system")
    assert not marker.exists()


# =============================================================================================
# Nothing is allocated before the state fits

def recording(monkeypatch, family: str) -> list[str]:
    """The device each network of ``family`` is built on, as load_msst builds them."""
    built: list[str] = []

    class Recording(CLASSES[family]):
        def __init__(self, *args, **kwargs):
            built.append(torch.empty(()).device.type)
            super().__init__(*args, **kwargs)

    monkeypatch.setitem(msst._CLASSES, family, Recording)
    return built


@pytest.mark.parametrize("family", [BS_ROFORMER, MEL_BAND_ROFORMER])
def test_a_state_that_fits_is_compared_on_meta_then_built(tmp_path, monkeypatch, family):
    path = saved(tmp_path, family)
    built = recording(monkeypatch, family)
    load_msst(path)
    assert built == ["meta", "cpu"]


def test_a_huge_config_with_a_tiny_state_is_refused_before_allocation(tmp_path, monkeypatch):
    """A config of a large network (hundreds of MB of weights) with the small network's
    state: refused by the meta-device comparison; no network is built for real."""
    path = saved(tmp_path, dim=1024, depth=8)
    built = recording(monkeypatch, BS_ROFORMER)
    refused(path, "the config has dim 1024, the weights 16", "the config has 8 layers")
    assert built == ["meta"]
    with torch.device("meta"):
        large = BSRoformer(**config_data(BS_ROFORMER, dim=1024, depth=8)["model"])
    assert sum(p.numel() for p in large.parameters()) > 100_000_000
