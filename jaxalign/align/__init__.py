"""jaxalign.align"""
