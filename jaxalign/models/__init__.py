"""jaxalign.models"""
