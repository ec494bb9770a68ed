"""qprep"""
