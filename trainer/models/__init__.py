"""The networks, one file each, DiT-style, with the official state-dict keys.

    sit             SiT (class-conditional): ``SiT``, ``ModelConfig``, ``SIT_PRESETS``
"""
