"""mipp: structured pruning that preserves mutual information between adjacent layers.

Method: Westphal, Hailes & Musolesi, "Mutual Information Preserving Neural Network Pruning" (arXiv 2411.00147).
"""
__version__ = "0.1.0"
