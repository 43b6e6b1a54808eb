"""The cache contract and its I/O; the one place writer and readers agree on what a sample is.

    schema          field names, dtypes, shapes, specs, manifests, sample encode/decode
    codecs          teacher-target codecs (registry ``get_codec``; pieces in codecs_base, codecs_tokens)
    shards          atomic deterministic tar writing, temp-file cleanup, JSON I/O
    groups          content-addressed group keys and ``index.json``
    reader          ``open_cache``, ``check_cache``, ``Requirements``, indexed shard reads
    loader          ``CacheStream`` / ``make_loader``: the resumable training stream
    text            the text group: caption encodings, the empty-caption file, ragged batches, caption picks
    fidelity        how far decoded teacher targets are from exact ones (KL, gradient cosine)
"""
