"""What lrc knows about a model's structure: one adapter per architecture (lrc.model.adapters), the
projections it targets (`Projection`, `target_linears`), mixture-of-experts unfusing, and module surgery."""
