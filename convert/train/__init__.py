"""Training the miniature Step-3.5 that ships as stepstream's embedded default (needs the [train] extra)."""
