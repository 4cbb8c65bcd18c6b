"""jaxalign.memory"""
