"""Reading and writing files: the one home of the plumbing every higher layer shares.

``files`` (atomic, fsynced writes; JSON that is checked for its type and depth), ``safetensors`` (a memory-mapped
reader and a streaming writer), ``checkpoint`` (the checkpoint layout, its manifest of checksums, loading a model
from a checkpoint or run) and ``tokenizer`` (tokenizer files and the end-of-text token). Nothing here knows about
optimizers, training or the command line.
"""
