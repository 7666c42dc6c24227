"""fastslow: distil a Slow cross-attention captioner into a Fast dual encoder, and rerank its top-k with it."""

__version__ = "0.1.0"
