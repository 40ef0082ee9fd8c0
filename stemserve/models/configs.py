"""Constructor arguments of demucs 4.0.1's released models (the ``kwargs`` their packages
store), for tests and benchmarks that need a model without downloading a checkpoint.

A checkpoint's own ``kwargs`` always win over these. ``HTDEMUCS`` is exactly the kwargs
stored in the htdemucs package (955717e8); the others are rebuilt from demucs 4.0.1's
``conf/config.yaml``, its grids (``demucs/grids/*.py``) and ``docs/training.md``.
"""
from __future__ import annotations

from fractions import Fraction

from stemserve.defaults import SOURCES, STEM_NAMES

SOURCES_4 = list(SOURCES)
SOURCES_6 = list(STEM_NAMES)  # htdemucs_6s' order

# htdemucs (955717e8); htdemucs_ft's members (f7e0c4bc, d12395a8, 92cfc3b6, 04573f0d) are
# it, fine-tuned. The 7.8 s segment is 343,980 samples.
HTDEMUCS = dict(
    sources=SOURCES_4, audio_channels=2, samplerate=44100, segment=Fraction(39, 5),
    channels=48, channels_time=None, growth=2, nfft=4096, wiener_iters=0, end_iters=0,
    wiener_residual=False, cac=True, depth=4, rewrite=True, multi_freqs=[],
    multi_freqs_depth=3, freq_emb=0.2, emb_scale=10, emb_smooth=True, kernel_size=8,
    stride=4, time_stride=2, context=1, context_enc=0, norm_starts=4, norm_groups=4,
    dconv_mode=3, dconv_depth=2, dconv_comp=8, dconv_init=0.001, bottom_channels=512,
    t_layers=5, t_hidden_scale=4.0, t_heads=8, t_dropout=0.02, t_layer_scale=True,
    t_gelu=True, t_emb="sin", t_max_positions=10000, t_max_period=10000.0,
    t_weight_pos_embed=1.0, t_cape_mean_normalize=True, t_cape_augment=True,
    t_cape_glob_loc_scale=[5000.0, 1.0, 1.4], t_sin_random_shift=0, t_norm_in=True,
    t_norm_in_group=False, t_group_norm=False, t_norm_first=True, t_norm_out=True,
    t_weight_decay=0.0, t_lr=None, t_sparse_self_attn=False, t_sparse_cross_attn=False,
    t_mask_type="diag", t_mask_random_seed=42, t_sparse_attn_window=400,
    t_global_window=100, t_sparsity=0.95, t_auto_sparsity=False, t_cross_first=False,
    rescale=0.1)

# htdemucs_6s (5c90dfd2): htdemucs with six sources ("6 sources version of htdemucs").
HTDEMUCS_6S = dict(HTDEMUCS, sources=SOURCES_6)

# hdemucs_mmi (75fc33f5): "a regular Hybrid Demucs trained on the same dataset" as
# htdemucs: config.yaml's `hdemucs` section with grids/mmi.py's 10 s segments (x4 = 40).
# The mdx_extra members are 48-channel HDemucs too ("two of them are using CaC, and two
# are using amplitude spectrograms with masking": cac=False); the MDX hybrids may use
# hybrid_old and multi_freqs, which their own kwargs say.
HDEMUCS_MMI = dict(
    sources=SOURCES_4, audio_channels=2, samplerate=44100, segment=40, channels=48,
    channels_time=None, growth=2, nfft=4096, wiener_iters=0, end_iters=0,
    wiener_residual=False, cac=True, depth=6, rewrite=True, hybrid=True, hybrid_old=False,
    multi_freqs=[], multi_freqs_depth=3, freq_emb=0.2, emb_scale=10, emb_smooth=True,
    kernel_size=8, stride=4, time_stride=2, context=1, context_enc=0, norm_starts=4,
    norm_groups=4, dconv_mode=1, dconv_depth=2, dconv_comp=4, dconv_attn=4, dconv_lstm=4,
    dconv_init=1e-3, rescale=0.1)

# The time-domain members of mdx (0d19c1c6, 7ecf8ec1): "64ch time domain only improved
# Demucs, with new residual branches, group norm": config.yaml's `demucs` section with
# its 11 s segments (x4 = 44, the bag's `segment: 44`). The time members of repro_mdx_a
# (grids/repro.py) add normalize=True.
DEMUCS_MDX = dict(
    sources=SOURCES_4, audio_channels=2, samplerate=44100, segment=44, channels=64,
    growth=2, depth=6, rewrite=True, lstm_layers=0, kernel_size=8, stride=4, context=1,
    gelu=True, glu=True, norm_groups=4, norm_starts=4, dconv_depth=2, dconv_mode=1,
    dconv_comp=4, dconv_attn=4, dconv_lstm=4, dconv_init=1e-4, resample=True,
    normalize=False, rescale=0.1)
DEMUCS_REPRO = dict(DEMUCS_MDX, normalize=True)

# The RoFormer releases' networks (their config.yaml's ``model:``; training-only fields left
# out): viperx's BS-RoFormer 1297 (model_bs_roformer_ep_317_sdr_12.9755.yaml) and Kim's
# Mel-Band RoFormer (vocals_mel_band_roformer.yaml). zero_dc is as audio-separator runs them
# (it ignores the option; MSST zeroes the DC bin since Sept 2025). Both separate ``vocals``
# from chunks of 352,800 samples, two chunks over each sample (num_overlap 2).
ROFORMER_SPLIT = dict(chunk_size=352800, num_overlap=2, normalize=False)
_ROFORMER_COMMON = dict(stereo=True, num_stems=1, time_transformer_depth=1,
                        freq_transformer_depth=1, dim_head=64, heads=8, stft_n_fft=2048,
                        stft_hop_length=441, stft_win_length=2048, mask_estimator_depth=2,
                        zero_dc=False)
BS_ROFORMER_1297 = dict(_ROFORMER_COMMON, dim=512, depth=12)
MEL_BAND_ROFORMER_KIM = dict(_ROFORMER_COMMON, dim=384, depth=6, num_bands=60)
