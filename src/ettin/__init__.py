"""ettin: train encoders and decoders as matched pairs and compare them fairly."""

__version__ = "0.1.0"
