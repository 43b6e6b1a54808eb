"""Frozen models that preprocessing runs, and where their weights come from.

    vae             SD-VAE: ``load_vae``, ``encode_moments``, ``sample_latents``, ``decode_latents``
    teacher         DINOv2 through timm with forward hooks: ``load_teacher`` -> ``Teacher``
    text            CLIP ViT-L/14's text model + tokenizer (U-ViT's recipe): ``load_text_encoder``
    weights         hub ids, local files, random presets, offline errors, weight hashes
"""
