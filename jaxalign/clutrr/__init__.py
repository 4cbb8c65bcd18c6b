"""jaxalign.clutrr"""
