"""Siamese (sentence-embedding) similarity: the explainer and its integrated-Jacobian engine."""
