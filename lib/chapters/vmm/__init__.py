"""chapters.vmm"""
