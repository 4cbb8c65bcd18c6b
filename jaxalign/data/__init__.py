"""jaxalign.data"""
