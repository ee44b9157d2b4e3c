"""Display: escaped HTML, matplotlib plots and console tables. Knows the core types only; no torch."""
