"""chapters.seed_repro"""
