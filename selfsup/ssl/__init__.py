"""Self-supervised methods, one file each, listed in METHODS (name -> constructor).

Never run a file of this folder as a script: that would put the folder on sys.path and shadow
the standard library's `ssl`.
"""
