"""jaxalign.train"""
