"""jaxalign.configs"""
