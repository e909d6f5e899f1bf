"""chapters.intro"""
