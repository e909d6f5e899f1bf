"""chapters.page_table"""
