"""chapters.uvm"""
