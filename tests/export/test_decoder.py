"""The decoder against diffusers' AutoencoderKL and transformers' SpeechT5HifiGan."""

import dataclasses

import pytest
import torch

from vssflow.export.decoder import (Decoder, VAEDecoder, VAEDims, Vocoder, VocoderDims, authors_state_dict,
                                    load_decoder, load_vae_decoder, load_vocoder, vae_authors_state_dict,
                                    vocoder_authors_state_dict)
from vssflow.export.errors import CheckpointError

# Closer to the real widths (3 blocks, 2 layers per block, 32 groups), still a few seconds on CPU.
MEDIUM_VAE = VAEDims(block_out_channels=(64, 128, 128), layers_per_block=2)
MEDIUM_VOCODER = VocoderDims(upsample_initial_channel=128)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _diffusers_vae(dims: VAEDims, sd: dict | None = None):
    from diffusers import AutoencoderKL

    n = len(dims.block_out_channels)
    ref = AutoencoderKL(in_channels=dims.in_channels, out_channels=dims.out_channels,
                        latent_channels=dims.latent_channels, block_out_channels=dims.block_out_channels,
                        layers_per_block=dims.layers_per_block, norm_num_groups=dims.norm_num_groups,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        scaling_factor=1.0)
    if sd is not None:
        ref.load_state_dict(sd, strict=True)
    return ref.eval()


def _hifigan_config(dims: VocoderDims):
    from transformers import SpeechT5HifiGanConfig

    return SpeechT5HifiGanConfig(
        model_in_dim=dims.model_in_dim, sampling_rate=dims.sampling_rate,
        upsample_initial_channel=dims.upsample_initial_channel, upsample_rates=list(dims.upsample_rates),
        upsample_kernel_sizes=list(dims.upsample_kernel_sizes),
        resblock_kernel_sizes=list(dims.resblock_kernel_sizes),
        resblock_dilation_sizes=[list(d) for d in dims.resblock_dilation_sizes],
        leaky_relu_slope=dims.leaky_relu_slope, normalize_before=dims.normalize_before)


def _transformers_vocoder(dims: VocoderDims, sd: dict | None = None):
    from transformers import SpeechT5HifiGan

    ref = SpeechT5HifiGan(_hifigan_config(dims))
    if sd is not None:
        ref.load_state_dict(sd, strict=True)
    return ref.eval()


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape, f"{ours.shape=} {ref.shape=}"
    assert ref.std() > 0.05, f"trivial reference output: {ref.std()=}"
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"max abs err {err:.3g}"


# --- dims and keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["tiny", "full"])
def test_dims_round_trip(size):
    device = "meta" if size == "full" else "cpu"
    for dims in (VAEDims.preset(size), VocoderDims.preset(size)):
        sd = authors_state_dict(dims, generator=_gen(0), device=device)
        assert type(dims).from_state_dict(sd) == dims
        if device == "meta":
            assert all(v.is_meta for v in sd.values())


def test_full_dims_accept_audioldm2_configs():
    """The fields of AudioLDM2's vae/config.json and vocoder/config.json agree with the shapes."""
    vae_cfg = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512],
               "down_block_types": ["DownEncoderBlock2D"] * 3, "in_channels": 1, "latent_channels": 8,
               "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 1, "sample_size": 1024,
               "scaling_factor": 0.4, "up_block_types": ["UpDecoderBlock2D"] * 3}
    voc_cfg = {"model_in_dim": 64, "normalize_before": False, "resblock_dilation_sizes": [[1, 3, 5]] * 3,
               "resblock_kernel_sizes": [3, 7, 11], "sampling_rate": 16000, "upsample_initial_channel": 1024,
               "upsample_kernel_sizes": [16, 16, 8, 4, 4], "upsample_rates": [5, 4, 2, 2, 2],
               "leaky_relu_slope": 0.1}
    for dims, cfg in ((VAEDims.preset("full"), vae_cfg), (VocoderDims.preset("full"), voc_cfg)):
        assert type(dims).from_state_dict(authors_state_dict(dims, device="meta"), cfg) == dims


def test_medium_dims_round_trip():
    assert VAEDims.from_state_dict(vae_authors_state_dict(MEDIUM_VAE, device="meta")) == MEDIUM_VAE
    assert VocoderDims.from_state_dict(vocoder_authors_state_dict(MEDIUM_VOCODER, device="meta")) == MEDIUM_VOCODER


def test_full_dims_are_audioldm2():
    vae, voc = VAEDims.preset("full"), VocoderDims.preset("full")
    assert (vae.latent_channels, vae.block_out_channels, vae.layers_per_block) == (8, (128, 256, 512), 2)
    assert vae.upscale == 4 and (vae.in_channels, vae.out_channels, vae.norm_num_groups) == (1, 1, 32)
    assert voc.hop_length == 160 and voc.num_samples(1000) == 160_032
    assert all(voc.num_samples(n) == 160 * n + 32 for n in (1, 7, 100, 1000))


def test_keys_match_diffusers_and_transformers_exactly():
    for dims in (VAEDims.preset("tiny"), MEDIUM_VAE):
        ours = _shapes(vae_authors_state_dict(dims, device="meta"))
        assert _shapes(_diffusers_vae(dims).state_dict()) == ours
        module = _shapes(VAEDecoder(dims).state_dict())
        assert module.items() <= ours.items()
        # only the decode path: the encoder and quant_conv are in the file but unused
        assert set(ours) - set(module) == {k for k in ours if k.startswith(("encoder.", "quant_conv."))}

    for dims in (VocoderDims.preset("tiny"), MEDIUM_VOCODER):
        ours = _shapes(vocoder_authors_state_dict(dims, device="meta"))
        assert _shapes(_transformers_vocoder(dims).state_dict()) == ours
        assert _shapes(Vocoder(dims).state_dict()) == ours


def test_full_output_shapes_on_meta():
    with torch.device("meta"):
        dec = Decoder(VAEDecoder(VAEDims.preset("full")), Vocoder(VocoderDims.preset("full")))
        mel = dec.latent_to_mel(torch.empty(1, 128, 250))
        wav = dec(torch.empty(1, 128, 250))
    assert mel.shape == (1, 1000, 64) and wav.shape == (1, 160_032)


# --- numerics against the oracles ---------------------------------------------------------------

@pytest.mark.parametrize("dims", [VAEDims.preset("tiny"), MEDIUM_VAE], ids=["tiny", "medium"])
def test_vae_decode_matches_diffusers(dims):
    sd = vae_authors_state_dict(dims, generator=_gen(1))
    ours, ref = load_vae_decoder(sd), _diffusers_vae(dims, sd)
    z = torch.randn(2, dims.latent_channels, 25, 16, generator=_gen(2))
    with torch.no_grad():
        out, expected = ours(z), ref.decode(z).sample
    assert out.shape == (2, 1, 100, 64)
    _close(out, expected)


def test_vae_norm_eps_on_quiet_input():
    """GroupNorm eps 1e-6 (not torch's 1e-5) only shows where activations are tiny."""
    dims = VAEDims.preset("tiny")
    sd = vae_authors_state_dict(dims, generator=_gen(1))
    sd["post_quant_conv.bias"].zero_()
    sd["decoder.conv_in.bias"].zero_()
    ours, ref = load_vae_decoder(sd), _diffusers_vae(dims, sd)
    z = 1e-3 * torch.randn(1, dims.latent_channels, 6, 16, generator=_gen(2))
    with torch.no_grad():
        _close(ours(z), ref.decode(z).sample)


@pytest.mark.parametrize("dims", [VocoderDims.preset("tiny"), MEDIUM_VOCODER,
                                  dataclasses.replace(VocoderDims.preset("tiny"), normalize_before=True,
                                                      leaky_relu_slope=0.2)],
                         ids=["tiny", "medium", "normalize_before"])
def test_vocoder_matches_transformers(dims):
    sd = vocoder_authors_state_dict(dims, generator=_gen(3))
    cfg = {"normalize_before": dims.normalize_before, "leaky_relu_slope": dims.leaky_relu_slope}
    ours, ref = load_vocoder(sd, cfg), _transformers_vocoder(dims, sd)
    assert ours.dims == dims
    mel = torch.randn(2, 37, dims.model_in_dim, generator=_gen(4)) - 2.0  # log-mel-like offset
    with torch.no_grad():
        out, expected = ours(mel), ref(mel)
    assert out.shape == (2, 160 * 37 + 32) == (2, dims.num_samples(37))
    _close(out, expected)


def test_decoder_matches_authors_infer_path():
    """infer.py: z[:, :128] -> reshape [B,-1,8,T] -> transposes -> vae.decode -> squeeze(1) -> vocoder."""
    vae_dims, voc_dims = VAEDims.preset("tiny"), VocoderDims.preset("tiny")
    vae_sd = vae_authors_state_dict(vae_dims, generator=_gen(5))
    voc_sd = vocoder_authors_state_dict(voc_dims, generator=_gen(6))
    dec = load_decoder(vae_sd, voc_sd)
    vae, voc = _diffusers_vae(vae_dims, vae_sd), _transformers_vocoder(voc_dims, voc_sd)
    z = torch.randn(2, 128, 25, generator=_gen(7))
    with torch.no_grad():
        latent = z.reshape([2, -1, 8, z.shape[-1]]).transpose(-2, -3).transpose(-2, -1)
        mel_ref = vae.decode(latent).sample
        expected = voc(mel_ref.squeeze(1))
        mel, out = dec.latent_to_mel(z), dec(z)
    assert dec.latent_to_vae_input(z).shape == (2, 8, 25, 16)
    assert torch.equal(dec.latent_to_vae_input(z), latent)
    _close(mel, mel_ref.squeeze(1))
    assert out.shape == (2, 640 * 25 + 32)
    _close(out, expected)


def test_scale_factor_divides_latent():
    dims_v, dims_c = VAEDims.preset("tiny"), VocoderDims.preset("tiny")
    dec = load_decoder(vae_authors_state_dict(dims_v, generator=_gen(8)),
                       vocoder_authors_state_dict(dims_c, generator=_gen(9)), scale_factor=2.0)
    z = torch.randn(1, 128, 5, generator=_gen(10))
    with torch.no_grad():
        assert torch.allclose(dec.latent_to_mel(z), dec.vae(dec.latent_to_vae_input(z / 2.0)).squeeze(1))


# --- errors and config --------------------------------------------------------------------------

def test_rates_and_dilations_come_from_config():
    dims = VocoderDims(upsample_initial_channel=32, upsample_rates=(4, 4, 2, 2, 2),
                       upsample_kernel_sizes=(8, 8, 4, 4, 4), resblock_kernel_sizes=(3, 5),
                       resblock_dilation_sizes=((1, 2), (2, 6)))
    sd = vocoder_authors_state_dict(dims, device="meta")
    cfg = {"upsample_rates": [4, 4, 2, 2, 2], "resblock_dilation_sizes": [[1, 2], [2, 6]]}
    assert VocoderDims.from_state_dict(sd, cfg) == dims
    with pytest.raises(CheckpointError, match="resblock_dilation_sizes"):
        VocoderDims.from_state_dict(sd)  # the default [1,3,5] has 3 dilations, the tensors 2
    with pytest.raises(CheckpointError, match="upsample_rates"):
        VocoderDims.from_state_dict(sd, {**cfg, "upsample_rates": [4, 4, 2, 2]})


def test_bad_state_dicts_raise_checkpoint_error():
    sd = vae_authors_state_dict(VAEDims.preset("tiny"), device="meta")
    with pytest.raises(CheckpointError, match="vae.post_quant_conv.weight"):
        VAEDims.from_state_dict({k: v for k, v in sd.items() if k != "post_quant_conv.weight"})
    with pytest.raises(CheckpointError, match="block_out_channels"):
        VAEDims.from_state_dict(sd, {"block_out_channels": [128, 256, 512]})
    with pytest.raises(CheckpointError, match="norm_num_groups"):
        VAEDims.from_state_dict(sd, {"norm_num_groups": 24})
    sd = vae_authors_state_dict(VAEDims.preset("tiny"), generator=_gen(0))
    with pytest.raises(CheckpointError, match="vae.decoder.mid_block.attentions.0.to_q.weight"):
        load_vae_decoder({k: v for k, v in sd.items() if k != "decoder.mid_block.attentions.0.to_q.weight"})
    voc = vocoder_authors_state_dict(VocoderDims.preset("tiny"), generator=_gen(0))
    with pytest.raises(CheckpointError, match="vocoder.conv_pre.weight"):
        VocoderDims.from_state_dict({k: v for k, v in voc.items() if k != "conv_pre.weight"})
    with pytest.raises(CheckpointError, match="vocoder"):
        load_vocoder({**voc, "conv_post.weight": torch.zeros(1, 2, 5)})


def test_onnx_export_keeps_batch_and_length_dynamic(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    dec = load_decoder(vae_authors_state_dict(VAEDims.preset("tiny"), generator=_gen(0)),
                       vocoder_authors_state_dict(VocoderDims.preset("tiny"), generator=_gen(1)))
    path = tmp_path / "decoder.onnx"
    torch.onnx.export(dec, (torch.randn(1, 128, 25),), str(path), input_names=["z"], output_names=["audio"],
                      dynamic_axes={"z": {0: "batch", 2: "frames"}, "audio": {0: "batch", 1: "samples"}},
                      opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    z = torch.randn(2, 128, 12, generator=_gen(2))  # other batch and length than traced
    out = session.run(None, {"z": z.numpy()})[0]
    with torch.no_grad():
        _close(torch.from_numpy(out), dec(z))
