"""The networks, one file each, DiT-style, with the official state-dict keys.

    common          what both networks share: config base, ``ModelOut``, embedders, final layer,
                    sin-cos table, projector, forward checks
    sit             SiT (class-conditional): ``SiT``, ``ModelConfig``, ``SIT_PRESETS``
    mmdit           MM-DiT (text-conditional, SD3 joint attention): ``MMDiT``, ``MMDiTConfig``,
                    ``MMDIT_PRESETS``, ``official_mmdit_config`` (an official T2I checkpoint's args)
    archs           the table the trainer builds from: ``model.arch`` -> config class, presets, module,
                    conditioning kind (``build_network``, ``transformer_blocks``)
"""
