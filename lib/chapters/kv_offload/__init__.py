"""chapters.kv_offload"""
