"""The library every stage shares: no CLI parsing, no import-time side effects.

Wings by concern; arrows only point down (``inputs``/``encoders``/``metrics`` -> ``cache`` ->
the two base modules here), never sideways between wings, never up into ``trainer``/``stages``:

    pipeline.cache      the cache contract and its I/O (schema, codecs, shards, groups, reader, loader)
    pipeline.encoders   frozen models preprocessing runs: SD-VAE, DINOv2 teacher, weights resolution
    pipeline.inputs     what preprocessing reads: sources, image decode + crops, synthetic data,
                        datasets other codebases prepared (edm2/REPA/HASTE, REPA-E)
    pipeline.metrics    FID/IS/P/R/KID, feature extractors, the resumable sample store
    pipeline.configs    typed dataclass configs from YAML + ``--set`` overrides
    pipeline.dist       process groups (works without torchrun)
"""
