"""normcli: compare BatchNorm, LayerNorm and GroupNorm in small CNNs from the shell."""

__version__ = "0.1.0"
