"""What preprocessing reads, up to "a uint8 (R, R, 3) image with a key and a label".

    sources         ``open_source``: image folder trees, WebDataset tars, ``synthetic:<n>``
    images          listing, robust decoding, the ADM center crop
    synth           the deterministic synthetic dataset (``haste synth``)
    captions        captioned sources (MS-COCO, caption folders, img2dataset tars) and ``open_input``
    synth_captions  ``synthetic-captions:<n>``: compositional captions, held-out combinations
    prompts         text-to-image eval prompts: a caption source (COCO val) or a prompt file, fixed order
    uvit            U-ViT / HASTE COCO features (moments, CLIP contexts, PNGs) for ``haste import uvit``
    prepared        datasets other codebases already preprocessed (edm2/REPA/HASTE, REPA-E),
                    images paired with their VAE moments by name
    prepared_formats  their stores (folder | zip | HDF5), dataset.json, moments files
"""
