"""jaxalign.evaluate"""
