"""jaxalign.io"""
