"""chapters.kernel"""
