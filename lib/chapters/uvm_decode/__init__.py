"""chapters.uvm_decode"""
