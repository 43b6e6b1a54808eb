"""Evaluation: scores, the feature extractors behind them, and the sample store they read.

    scores          ``compute_metrics``: FID (vs reference mu/sigma), IS, P/R, KID, FD-DINOv2; ``preflight``
    frechet         the Fréchet distance of two Gaussian feature fits (ADM's sqrtm, or eigh)
    extractors      torch-fidelity extractors, weights read as plain tensors (sha256 checked), offline checks
    reference       reference batches: ADM-style .npz (never unpickled) or image folders
    feature_cache   reference features cached as plain .npy (never torch-fidelity's pickled .pt cache)
    clip_score      CLIP score of text-to-image samples: 100 · max(cos, 0), the exact definition there
    sample_store    the resumable zarr (format 2) store of generated samples (+ prompts), npz export
    grid            contact sheets, captioned with the prompts for text-to-image
"""
