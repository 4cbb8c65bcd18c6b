"""jaxalign.distill"""
