"""chapters.rerun"""
