"""The network: :class:`Transformer` (encoder or decoder by ``config.causal``)."""

from ettin.model.transformer import Transformer

__all__ = ["Transformer"]
