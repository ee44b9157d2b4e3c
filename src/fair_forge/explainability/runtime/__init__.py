"""Model calls: the scorer, the packer, the batch engine, memory budgets, model loading, generation and the
table of architecture facts."""
