"""chapters.seed"""
