"""`aggregator warm`: fill aggregate entries before traffic asks for them."""
