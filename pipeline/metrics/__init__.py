"""Evaluation: scores, the feature extractors behind them, and the sample store they read.

    scores          ``compute_metrics``: FID (vs reference mu/sigma), IS, P/R, KID, FD-DINOv2
    extractors      torch-fidelity extractors, offline weights checks, reference npz loading
    sample_store    the resumable zarr store of generated samples, npz export, contact sheets
"""
