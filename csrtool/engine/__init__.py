"""The numeric engine: pursuit, dictionary learning, packing, attention on codes. Imports only torch.

Device-agnostic: every function allocates on its input's device and dtype and
never prints. Dimension letters used in shape comments throughout:
L layers, H heads, T tokens, D head_dim (or chunk width), N atoms, S sparsity,
B a batch of vectors, C channel-split chunks.
"""
